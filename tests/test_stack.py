"""Stacked layers (models/stack.py): one module with [L, ...] Variables run under a scan gives
what L separately built blocks give in a Python loop (values, gradients, remat, a layer range,
LoRA dropout's RNG counters), and the compiled program holds one block, not L."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perpo_jax.config import LoraConfig
from perpo_jax.mesh import variable_axes
from perpo_jax.models.config import TextConfig
from perpo_jax.models.decoder import DecoderBlock, DecoderLM
from perpo_jax.models.lora import apply_lora
from perpo_jax.models.stack import LAYER_AXIS, num_stacked, scan_layers, stack_modules
from perpo_jax.train.state import partition_model
from perpo_jax.train.step import policy_model

CFG = TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=4)


class Affine(nnx.Module):
    """y = tanh(x · w + b) with a dropout stream: the smallest block with params and RNG."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 4)) / 2, out_sharding=("embed", "mlp"),
                              eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((4,)), out_sharding=("mlp",), eager_sharding=False)
        self.drop = nnx.Dropout(0.5, deterministic=False, rngs=nnx.RngStream(rngs.dropout(), tag="dropout"))

    def __call__(self, x):
        return self.drop(jnp.tanh(x @ self.w[...] + self.b[...]))


def test_stack_equals_separate_blocks_and_names_the_layer_axis():
    rngs_a, rngs_b = nnx.Rngs(0), nnx.Rngs(0)
    stacked = stack_modules(lambda: DecoderBlock(CFG, rngs=rngs_a), 3)
    separate = [DecoderBlock(CFG, rngs=rngs_b) for _ in range(3)]
    assert num_stacked(stacked) == 3
    q = stacked.self_attn.q_proj.kernel
    assert q[...].shape == (3, 16, 4, 4)
    assert variable_axes(q) == (LAYER_AXIS, "embed", "heads", "head_dim")
    for i, block in enumerate(separate):  # layer i = the i-th block built alone, same init
        np.testing.assert_array_equal(np.asarray(q[...][i]), np.asarray(block.self_attn.q_proj.kernel[...]))


def test_scan_equals_python_loop_values_gradients_and_remat():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 5, 16)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 1, 5))
    from perpo_jax.models.layers import rope_cos_sin, rope_inv_freq

    cos, sin = rope_cos_sin(pos, rope_inv_freq(4, 10000.0, None), jnp.float32)
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    stacked = stack_modules(lambda: DecoderBlock(CFG, rngs=nnx.Rngs(1)), 3)
    graphdef, state = nnx.split(stacked)

    def run_scan(state, x, remat):
        blocks = nnx.merge(graphdef, state)
        out, kv = scan_layers(blocks, lambda b, x, _: b(x, cos, sin, mask, None, None, None),
                              x, remat=remat)
        return (out ** 2).sum(), kv

    def run_loop(state, x):
        for i in range(3):
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            x, _ = block(x, cos, sin, mask, None, None, None)
        return (x ** 2).sum()

    (loss, (k, _)), grads = jax.value_and_grad(run_scan, has_aux=True)(state, x, False)
    loss_loop, grads_loop = jax.value_and_grad(run_loop)(state, x)
    (loss_remat, _), grads_remat = jax.value_and_grad(run_scan, has_aux=True)(state, x, True)
    assert k.shape == (3, 2, 1, 5, 2, 4)  # every layer's keys, stacked
    np.testing.assert_allclose(loss, loss_loop, rtol=1e-6)
    np.testing.assert_allclose(loss_remat, loss_loop, rtol=1e-6)
    for g in (grads, grads_remat):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads_loop)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_layer_range_and_rng_write_back():
    stacked = stack_modules(lambda: Affine(nnx.Rngs(params=0, dropout=1)), 4)
    x = jnp.ones((3, 4))

    def body(block, x, _):
        return block(x), None

    before = np.asarray(stacked.drop.rngs.count[...])
    part, _ = scan_layers(stacked, body, x, start=1, stop=3)
    counts = np.asarray(stacked.drop.rngs.count[...])
    np.testing.assert_array_equal(counts - before, [0, 1, 1, 0])  # only layers 1 and 2 drew
    # layers 1..2 as a loop over slices, each drawing with its own key and count
    y = x
    for i in (1, 2):
        y = nnx.merge(*_layer(stacked, i, before))(y)
    np.testing.assert_allclose(part, y, rtol=1e-6)
    again, _ = scan_layers(stacked, body, x, start=1, stop=3)
    assert not np.allclose(again, part)  # advanced counters: new dropout masks
    with pytest.raises(ValueError, match="outside the 4 stacked layers"):
        scan_layers(stacked, body, x, start=2, stop=5)


def _layer(stacked, i, counts):
    graphdef, state = nnx.split(stacked)
    state = jax.tree.map(lambda a: a[i], state)
    state["drop"]["rngs"]["count"].set_value(jnp.asarray(counts[i]))
    return graphdef, state


def test_stacked_lora_is_one_adapter_per_layer():
    model = DecoderLM(CFG, rngs=nnx.Rngs(0))
    lora_cfg = LoraConfig(rank=2, alpha=4.0, dropout=0.1, targets=["(q_proj|k_proj|down_proj)$"])
    apply_lora(model, lora_cfg, nnx.Rngs(3))
    lora = model.layers.mlp.down_proj.lora
    assert lora.a[...].shape == (3, 32, 2) and lora.b[...].shape == (3, 2, 16)
    assert variable_axes(lora.a) == (LAYER_AXIS, "mlp", "lora_rank")
    lora.b.set_value(jnp.ones_like(lora.b[...]))
    delta = np.asarray(lora.delta())  # [L, F, D]: layer i's own A_i · B_i
    for i in range(3):
        np.testing.assert_allclose(delta[i], 2.0 * np.asarray(lora.a[...][i]) @ np.ones((2, 16)),
                                   rtol=1e-5)
    # the train step's reseed gives each layer of each adapter its own dropout key
    parts = partition_model(model, lora_cfg)
    train = policy_model(parts.graphdef, parts.params, parts.frozen, jax.random.key(7))
    keys = {name: np.asarray(jax.random.key_data(
        getattr(train.layers.self_attn, name).lora.dropout.rngs.key[...])) for name in ("q_proj", "k_proj")}
    assert keys["q_proj"].shape[0] == 3
    rows = [tuple(k.ravel()) for name in keys for k in keys[name]]
    assert len(set(rows)) == 6  # 3 layers x 2 projections, all different


def test_compiled_program_does_not_grow_with_depth():
    """The scanned program's HLO holds one block whatever L is (the unrolled loop grew ~L×)."""
    def hlo_size(layers):
        model = DecoderLM(CFG.replace(num_layers=layers), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        ids = jnp.zeros((1, 8), jnp.int32)
        fn = jax.jit(lambda s: nnx.merge(graphdef, s)(ids).sum())
        return len(fn.lower(state).as_text())

    small, large = hlo_size(2), hlo_size(12)
    assert large < 1.2 * small, (small, large)
