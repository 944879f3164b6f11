"""LoRA: placement, filters, base-as-reference, merge, export to transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_scoring import make_batch

from perpo_jax.config import LoraConfig
from perpo_jax.mesh import make_mesh, state_shardings
from perpo_jax.models import LlavaModel, tiny_llava_config
from perpo_jax.models.lora import LoRA, LoRAParam, apply_lora, lora_slots, merge_lora, trainable_filter
from perpo_jax.train.state import partition_model, reference_state

LLM_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(seed=0):
    cfg = tiny_llava_config(256, hidden_size=32, num_layers=2, image_size=16, patch_size=8)
    return LlavaModel(cfg, rngs=nnx.Rngs(seed)), cfg


def randomize_lora(model, seed=1):
    """B starts at zero (adapter = no-op); give A and B random values to exercise the math."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for _, linear in lora_slots(model):
        if linear.lora is not None:
            for var in (linear.lora.a, linear.lora.b):
                var.set_value(0.05 * jax.random.normal(next(keys), var[...].shape))


def forward(model, batch):
    ids = batch["prompt_ids"]
    return model(ids, attention_mask=batch["prompt_mask"], pixel_values=batch["pixel_values"])


def test_default_targets_are_the_llm_linears_only():
    model, _ = tiny()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    with_lora = sorted(p for p, m in lora_slots(model) if m.lora is not None)
    assert len(with_lora) == len(LLM_NAMES)  # one stacked module per projection
    assert all(p.startswith("language_model.layers.") and p.split(".")[-1] in LLM_NAMES for p in with_lora)
    without = [p for p, m in lora_slots(model) if m.lora is None]
    assert "language_model.lm_head" in without
    assert any(p.startswith("multi_modal_projector") for p in without)
    assert any(p.startswith("vision_tower") for p in without)
    q = model.language_model.layers.self_attn.q_proj
    # [L, D, r], [L, r, N, H]: one adapter per layer of the stacked blocks
    assert q.lora.a[...].shape == (2, 32, 4) and q.lora.b[...].shape == (2, 4, 4, 8)
    assert not np.allclose(np.asarray(q.lora.a[0]), np.asarray(q.lora.a[1]))  # own init each
    assert np.all(np.asarray(q.lora.b[...]) == 0)
    assert np.abs(np.asarray(q.lora.a[...])).max() <= 1 / np.sqrt(32)  # kaiming-uniform bound
    assert q.lora.scale == 2.0


def test_fresh_lora_is_a_no_op_and_bad_targets_fail():
    model, cfg = tiny()
    batch = make_batch(cfg, with_image=True)
    before = np.asarray(forward(model, batch))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(forward(model, batch)), before)
    with pytest.raises(ValueError, match="match no Linear"):
        apply_lora(tiny()[0], LoraConfig(targets=["no_such_layer"]), nnx.Rngs(1))


def test_filters_split_adapters_projector_and_frozen_base():
    model, _ = tiny()
    cfg = LoraConfig(rank=4, alpha=8.0, trainable=["multi_modal_projector"])
    apply_lora(model, cfg, nnx.Rngs(1))
    parts = partition_model(model, cfg)
    train_paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(parts.params)]
    assert sum("lora" in p for p in train_paths) == 2 * len(LLM_NAMES)  # A and B, stacked
    assert sorted(p for p in train_paths if "lora" not in p) == [
        "multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.kernel",
        "multi_modal_projector.linear_2.bias", "multi_modal_projector.linear_2.kernel",
    ]
    frozen_params = nnx.to_flat_state(nnx.split_state(parts.frozen, nnx.Param, ...)[0])
    assert not any(isinstance(v, LoRAParam) for _, v in frozen_params)
    assert any("q_proj" in ".".join(map(str, p)) for p, _ in frozen_params)
    # the reference holds copies of the projector only (LoRA is zeroed, not copied)
    ref_paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(parts.reference)]
    assert all(p.startswith("multi_modal_projector") for p in ref_paths) and len(ref_paths) == 4
    assert trainable_filter(LoraConfig(enabled=False)) is nnx.Param


def test_lora_params_carry_logical_names_and_shard():
    model, _ = tiny()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    params = nnx.state(model, LoRAParam)
    shardings = state_shardings(params, make_mesh((1, 2, 4)))
    q = shardings["language_model"]["layers"]["self_attn"]["q_proj"]["lora"]
    assert tuple(q["a"].spec) == (None, "fsdp", None)  # ("layers", "embed", "lora_rank")
    # ("layers", "lora_rank", "heads", "head_dim")
    assert tuple(q["b"].spec) == (None, "fsdp", "tensor", None)


def test_every_lora_param_is_split_under_an_fsdp_only_mesh():
    """The official recipe's mesh is [1, -1, 1]: no LoRA matrix may sit whole on every chip
    (each has one dimension that fsdp divides: `embed`, or the rank where `embed` is absent)."""
    model, _ = tiny()
    apply_lora(model, LoraConfig(rank=8, alpha=8.0, targets=[".*"]), nnx.Rngs(1))
    shardings = nnx.to_flat_state(state_shardings(nnx.state(model, LoRAParam),
                                                  make_mesh((1, 8, 1))))
    assert len(shardings) > 0
    replicated = [".".join(map(str, p)) for p, s in shardings if "fsdp" not in tuple(s.spec)]
    assert replicated == []


def test_reference_is_the_base_bit_for_bit():
    model, cfg = tiny()
    batch = make_batch(cfg, with_image=True)
    base = np.asarray(forward(model, batch))
    lcfg = LoraConfig(rank=4, alpha=8.0)
    apply_lora(model, lcfg, nnx.Rngs(1))
    randomize_lora(model)
    assert np.abs(np.asarray(forward(model, batch)) - base).max() > 1e-3  # adapters are live
    parts = partition_model(model, lcfg)
    ref = nnx.merge(parts.graphdef, reference_state(parts.params, parts.reference), parts.frozen)
    np.testing.assert_array_equal(np.asarray(forward(ref, batch)), base)


def test_dropout_only_in_train_mode():
    model, cfg = tiny()
    batch = make_batch(cfg, with_image=True)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.5), nnx.Rngs(1))
    randomize_lora(model)
    eval_a, eval_b = np.asarray(forward(model, batch)), np.asarray(forward(model, batch))
    np.testing.assert_array_equal(eval_a, eval_b)
    train = nnx.view(model, deterministic=False, raise_if_not_found=False)
    assert np.abs(np.asarray(forward(train, batch)) - eval_a).max() > 1e-4


def test_merge_matches_lora_and_exports_to_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from perpo_jax.hf.save import save_pretrained

    model, cfg = tiny()
    batch = make_batch(cfg, with_image=True, seed=5)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    randomize_lora(model)
    with_lora = np.asarray(forward(model, batch))
    merge_lora(model)
    assert all(m.lora is None for _, m in lora_slots(model))
    assert not jax.tree.leaves(nnx.state(model, LoRAParam))
    merged = np.asarray(forward(model, batch))
    np.testing.assert_allclose(merged, with_lora, atol=1e-5, rtol=0)

    save_pretrained(model, str(tmp_path / "export"))
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "export"))
    hf.eval()
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(np.array(batch["prompt_ids"]), dtype=torch.long),
            attention_mask=torch.tensor(np.array(batch["prompt_mask"]), dtype=torch.long),
            pixel_values=torch.tensor(np.array(batch["pixel_values"])),
        ).logits.numpy()
    real = np.asarray(batch["prompt_mask"])  # HF and we differ only at padded positions
    np.testing.assert_allclose(out[real], merged[real], atol=1e-4, rtol=1e-4)


def test_lora_module_math_matches_numpy():
    layer = LoRA((3, 4), (5,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                 rank=2, alpha=6.0, dropout=0.0, rngs=nnx.Rngs(0))
    layer.b.set_value(jnp.arange(10, dtype=jnp.float32).reshape(2, 5) / 10)
    x = np.random.default_rng(0).normal(size=(7, 3, 4)).astype(np.float32)
    a, b = np.asarray(layer.a[...]), np.asarray(layer.b[...])
    want = 3.0 * (x.reshape(7, 12) @ a.reshape(12, 2)) @ b
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.delta()), 3.0 * np.tensordot(a, b, 1), atol=1e-6)
