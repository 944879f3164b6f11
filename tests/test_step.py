"""The jitted sharded train step: mesh invariance, learning, skipping, LoRA invariants, schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_scoring import make_batch

from perpo_jax.config import LoraConfig, LossConfig, OptimConfig
from perpo_jax.mesh import make_mesh
from perpo_jax.models import LlavaModel, tiny_llava_config
from perpo_jax.models.lora import LoRAParam, apply_lora
from perpo_jax.train.progress import bar_fields
from perpo_jax.train.optim import make_optimizer, make_schedule
from perpo_jax.train.state import create_train_state, partition_model
from perpo_jax.train.step import build_ref_logps, build_train_step

LORA = LoraConfig(rank=8, alpha=16.0, dropout=0.05)
# eps=1e-3 keeps Adam's first update smooth in g (not ~sign(g)), so tiny float differences
# between meshes stay tiny in the updated params.
OPTIM = OptimConfig(lr=1e-2, schedule="constant", warmup_ratio=0.0, grad_clip=1.0, eps=1e-3)


def setup(mesh, *, lora=LORA, optim=OPTIM, loss=LossConfig(), grad_accum=1, num_layers=1,
          dtype="float32", remat=False):
    """Fresh tiny LLaVA -> (jitted step, state, frozen, reference, parts, model config)."""
    cfg = tiny_llava_config(256, hidden_size=32, num_layers=num_layers, image_size=16,
                            patch_size=8, dtype=dtype, param_dtype="float32")
    cfg = cfg.replace(text=cfg.text.replace(remat=remat))
    model = LlavaModel(cfg, rngs=nnx.Rngs(0))
    if lora.enabled:
        apply_lora(model, lora, nnx.Rngs(1))
    parts = partition_model(model, lora)
    optimizer, schedule = make_optimizer(optim, total_steps=20)
    state, frozen, reference = create_train_state(parts, optimizer, mesh, seed=0)
    step = build_train_step(parts.graphdef, state, frozen, reference, loss_cfg=loss,
                            optimizer=optimizer, schedule=schedule, mesh=mesh, grad_accum=grad_accum)
    return step, state, frozen, reference, parts, cfg


def host(tree):
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(jax.device_get(x))

    return jax.tree.map(one, tree)


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_step_on_2x2x2_mesh_equals_single_device():
    results = []
    for mesh in (make_mesh((2, 2, 2)), make_mesh((1, 1, 1), devices=jax.devices()[:1])):
        step, state, frozen, reference, _, cfg = setup(mesh)
        batch = make_batch(cfg, with_image=True, b=4, seed=7)
        if mesh.size == 8:  # params and optimizer state really are sharded
            a = state.params["language_model"]["layers"]["mlp"]["up_proj"]["lora"]["a"]
            assert tuple(a.sharding.spec) == (None, "fsdp", None)
            assert a.addressable_shards[0].data.shape == (a.shape[0], 16, 8)  # [L, 32, 8], fsdp=2
            mu = state.opt_state[1].mu["language_model"]["layers"]["mlp"]["up_proj"]["lora"]["a"]
            assert mu.sharding == a.sharding
            q = frozen["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
            assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
        state, metrics = step(state, frozen, reference, batch)
        state, metrics2 = step(state, frozen, reference, batch)
        results.append((host(metrics), host(metrics2), host(state.params), host(state.opt_state)))
    (m8, m8b, p8, o8), (m1, m1b, p1, o1) = results
    # (pair_accuracy is left out: at step 1 every s_i is 0 up to float noise, so it compares noise)
    for key in ("loss", "grad_norm", "margin", "chosen_reward"):
        np.testing.assert_allclose(m8[key], m1[key], atol=1e-5, rtol=0, err_msg=key)
        np.testing.assert_allclose(m8b[key], m1b[key], atol=1e-5, rtol=0, err_msg=key)
    assert m8b["loss"] != m8["loss"]  # the first update changed the policy
    assert_trees_close(p8, p1, atol=1e-5)
    assert_trees_close(o8, o1, atol=1e-5)


# lipo / lipo_lambda differ from perpo only in the pair weights (tests/test_losses.py checks
# them against numpy); one compile each here would double this test's CI time
@pytest.mark.parametrize("loss_name", ["perpo", "dpo", "sft"])
def test_few_steps_on_a_fixed_batch_lower_the_loss(loss_name):
    mesh = make_mesh((2, 2, 2))
    step, state, frozen, reference, _, cfg = setup(mesh, loss=LossConfig(name=loss_name))
    batch = make_batch(cfg, with_image=True, b=4, seed=11)
    history = []
    for _ in range(8):
        state, metrics = step(state, frozen, reference, batch)
        history.append(host(metrics))
    losses = [float(m["loss"]) for m in history]
    assert all(np.isfinite(losses)) and int(history[-1]["skipped"]) == 0
    # LiPO-lambda weights depend on the policy's ranking, which is arbitrary (all ties) at
    # step 0; compare from step 1 on, once the policy has an ordering.
    first = 1 if loss_name == "lipo_lambda" else 0
    assert losses[-1] < 0.98 * losses[first], losses
    assert all(b < a for a, b in zip(losses[first : first + 5], losses[first + 1 : first + 5])), losses
    if loss_name != "sft":
        assert abs(float(history[0]["margin"])) < 1e-4  # policy == reference at step 0
        assert history[-1]["pair_accuracy"] > 0.6
        assert history[-1]["margin"] > 0
    assert float(history[0]["tokens"]) > 0 and float(history[0]["lr"]) == pytest.approx(1e-2)
    # the train bar shows pair accuracy only where the loss has pairs (SFT lists have one
    # target: a pair_accuracy=0.00 there would be noise)
    shown = bar_fields({k: float(v) for k, v in history[-1].items()} | {"tokens_per_s": 1.0})
    assert ("pair_accuracy" in shown) == (loss_name != "sft")
    assert shown["loss"] == f"{losses[-1]:.4f}"


def test_lora_training_keeps_base_and_reference_fixed():
    mesh = make_mesh((4, 1, 2))
    step, state, frozen, reference, parts, cfg = setup(mesh)
    batch = make_batch(cfg, with_image=True, b=4, seed=3)
    ref_fn = build_ref_logps(parts.graphdef, state.params, frozen, reference, mesh=mesh)
    ref_before = np.asarray(ref_fn(state.params, frozen, reference, batch))
    base_before = host(frozen)
    lora_before = host(state.params)
    for _ in range(3):
        state, metrics = step(state, frozen, reference, dict(batch, ref_logps=jnp.asarray(ref_before)))
    assert int(metrics["skipped"]) == 0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(host(frozen)), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    b_moved = [np.abs(x - y).max() for (p, x), y in zip(
        jax.tree_util.tree_leaves_with_path(host(state.params)), jax.tree.leaves(lora_before))
        if "['b']" in jax.tree_util.keystr(p)]
    assert len(b_moved) == 7 and min(b_moved) > 0  # every adapter (7 linears x 1 layer) trained
    ref_after = np.asarray(ref_fn(state.params, frozen, reference, batch))
    np.testing.assert_array_equal(ref_after, ref_before)


def test_in_step_reference_equals_precomputed_reference():
    mesh = make_mesh((2, 2, 2))
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0)
    outs = []
    for precompute in (False, True):
        step, state, frozen, reference, parts, cfg = setup(mesh, lora=lora)
        batch = make_batch(cfg, with_image=True, b=4, seed=5)
        if precompute:
            ref_fn = build_ref_logps(parts.graphdef, state.params, frozen, reference, mesh=mesh)
            batch = dict(batch, ref_logps=ref_fn(state.params, frozen, reference, batch))
        state, m1 = step(state, frozen, reference, batch)
        state, m2 = step(state, frozen, reference, batch)  # policy != reference now
        outs.append((host(m1), host(m2), host(state.params)))
    (a1, a2, pa), (b1, b2, pb) = outs
    np.testing.assert_allclose(a2["loss"], b2["loss"], atol=1e-6)
    assert_trees_close(pa, pb, atol=1e-6)


def test_grad_accumulation_equals_one_big_batch():
    mesh = make_mesh((2, 2, 2))
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0)
    outs = []
    for accum in (1, 2):
        step, state, frozen, reference, _, cfg = setup(mesh, lora=lora, grad_accum=accum)
        batch = make_batch(cfg, with_image=True, b=8, seed=9)
        # uneven valid lists per micro-batch: list 2 (micro-batch 0) has all-equal rewards
        batch["rewards"] = batch["rewards"].at[2].set(0.5)
        state, metrics = step(state, frozen, reference, batch)
        outs.append((host(metrics), host(state.params)))
    (m1, p1), (m2, p2) = outs
    for key in ("loss", "grad_norm", "num_valid_lists", "tokens"):
        np.testing.assert_allclose(m1[key], m2[key], atol=1e-5, rtol=1e-6, err_msg=key)
    assert m1["num_valid_lists"] == 7
    assert_trees_close(p1, p2, atol=1e-5)


def test_non_finite_loss_skips_the_update():
    mesh = make_mesh((2, 2, 2))
    step, state, frozen, reference, _, cfg = setup(mesh)
    batch = make_batch(cfg, with_image=True, b=4, seed=2)
    ref = np.zeros(batch["rewards"].shape, np.float32)
    ref[0, 0] = np.nan  # a REAL candidate: poisons the loss
    params_before, opt_before = host(state.params), host(state.opt_state)
    state, metrics = step(state, frozen, reference, dict(batch, ref_logps=jnp.asarray(ref)))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(metrics["skipped"]) == 1 and int(state.skipped) == 1 and int(state.step) == 1
    for x, y in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(params_before)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(host(state.opt_state)), jax.tree.leaves(opt_before)):
        np.testing.assert_array_equal(x, y)
    state, metrics = step(state, frozen, reference, dict(batch, ref_logps=jnp.zeros_like(ref)))
    assert int(metrics["skipped"]) == 1 and int(metrics["applied"]) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(state.params)))


def test_batch_without_valid_list_leaves_weights_and_adam_state_unchanged():
    # A zero gradient is not a no-op for AdamW (momentum): such a batch must not update.
    mesh = make_mesh((2, 2, 2))
    step, state, frozen, reference, _, cfg = setup(mesh)
    batch = make_batch(cfg, with_image=True, b=4, seed=5)
    state, _ = step(state, frozen, reference, batch)  # a real update first: momentum is live
    params_before, opt_before = host(state.params), host(state.opt_state)
    empty = dict(batch, list_mask=jnp.zeros_like(jnp.asarray(batch["list_mask"])))
    state, metrics = step(state, frozen, reference, empty)
    assert float(metrics["num_valid_lists"]) == 0 and int(metrics["applied"]) == 0
    for x, y in zip(jax.tree.leaves(host(state.params)), jax.tree.leaves(params_before)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(host(state.opt_state)), jax.tree.leaves(opt_before)):
        np.testing.assert_array_equal(x, y)


def test_full_finetune_reference_is_a_frozen_copy():
    mesh = make_mesh((2, 2, 2))
    step, state, frozen, reference, parts, cfg = setup(mesh, lora=LoraConfig(enabled=False))
    assert not jax.tree.leaves(nnx.state(nnx.merge(parts.graphdef, parts.params, parts.frozen), LoRAParam))
    batch = make_batch(cfg, with_image=True, b=4, seed=4)
    ref_fn = build_ref_logps(parts.graphdef, state.params, frozen, reference, mesh=mesh)
    ref_before = np.asarray(ref_fn(state.params, frozen, reference, batch))
    for _ in range(2):
        state, metrics = step(state, frozen, reference, batch)
    assert float(metrics["pair_accuracy"]) > 0
    np.testing.assert_array_equal(np.asarray(ref_fn(state.params, frozen, reference, batch)), ref_before)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_matches_hf_formulas(kind):
    total, lr, ratio = 100, 2e-4, 0.03
    sched = make_schedule(OptimConfig(lr=lr, schedule=kind, warmup_ratio=ratio), total)
    warm = math.ceil(ratio * total)  # 3
    for s in (0, 1, 2, 3, 10, 50, 99, 100):
        if s < warm:
            want = lr * s / warm
        elif kind == "cosine":
            want = lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        elif kind == "linear":
            want = lr * (total - s) / (total - warm)
        else:
            want = lr
        assert float(sched(s)) == pytest.approx(want, abs=1e-10), s


def test_bf16_compute_with_remat_keeps_float32_master_state():
    mesh = make_mesh((2, 2, 2))
    losses = {}
    for dtype, remat in (("float32", False), ("bfloat16", True)):
        step, state, frozen, reference, _, cfg = setup(mesh, dtype=dtype, remat=remat)
        batch = make_batch(cfg, with_image=True, b=4, seed=13)
        for _ in range(2):
            state, metrics = step(state, frozen, reference, batch)
        assert int(metrics["skipped"]) == 0
        losses[dtype] = float(metrics["loss"])
        floats = jax.tree.leaves((state.params, state.opt_state))
        assert all(x.dtype in (jnp.float32, jnp.int32) for x in floats)
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.02, losses


def test_optimizer_times_schedule_is_adamw():
    """chain update × schedule(t) == optax.adamw(schedule) over steps with no skip."""
    cfg = OptimConfig(lr=1e-2, warmup_ratio=0.25, weight_decay=0.1, grad_clip=0.5)
    tx, schedule = make_optimizer(cfg, total_steps=8)
    reference = optax.chain(optax.clip_by_global_norm(0.5),
                            optax.adamw(schedule, weight_decay=0.1,
                                        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3)}
    ours, theirs = dict(params), dict(params)
    s_ours, s_theirs = tx.init(ours), reference.init(theirs)
    rng = np.random.default_rng(0)
    for t in range(6):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, s_ours = tx.update(grads, s_ours, ours)
        ours = jax.tree.map(lambda p, d: p + schedule(t) * d, ours, u)
        v, s_theirs = reference.update(grads, s_theirs, theirs)
        theirs = optax.apply_updates(theirs, v)
    assert_trees_close(ours, theirs, atol=1e-7)


def test_skipped_update_keeps_lr_on_the_plan():
    """A non-finite batch is skipped but its place in the schedule is used up: the lr of the
    last planned update is schedule(total - 1), not one behind."""
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optim = OptimConfig(lr=1e-2, schedule="linear", warmup_ratio=0.0, eps=1e-3)
    step, state, frozen, reference, _, cfg = setup(mesh, optim=optim)
    good = make_batch(cfg, with_image=True, b=4, seed=7)
    bad = dict(good, rewards=np.full_like(np.asarray(good["rewards"]), np.nan))
    lrs = []
    for batch in (good, bad, good):
        state, metrics = step(state, frozen, reference, batch)
        lrs.append(float(metrics["lr"]))
    assert int(state.skipped) == 1 and int(state.step) == 3
    _, schedule = make_optimizer(optim, total_steps=20)
    np.testing.assert_allclose(lrs, [float(schedule(t)) for t in range(3)], rtol=1e-6)
