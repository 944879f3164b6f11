"""Fused attention (models/attention_kernels.py) against the XLA custom-VJP core it replaces.

Splash runs in Pallas' interpret mode on CPU (the same kernel code as on TPU, as XLA ops);
values and gradients must match `grouped_attention`'s XLA path (decoder `_attend`) on every
row of a real token, in float32, to 1e-5. Padding rows are garbage by contract (they differ
between implementations) and must only be finite. The train step AOT-compiles for a v5e
topology (libtpu, from this CPU host) with the Mosaic kernel in it. cuDNN cannot run here (no
GPU): its argument mapping is checked with `jax.nn.dot_product_attention`'s XLA implementation.
"""
import functools
import json
import os
import runpy
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding, PartitionSpec
from test_scoring import make_batch

from perpo_jax.config import ConfigError, LoraConfig, LossConfig, OptimConfig, config_from_dict
from perpo_jax.mesh import batch_sharding, make_mesh
from perpo_jax.models import LlavaModel, tiny_llava_config
from perpo_jax.models.attention_kernels import (
    CausalOwnMask,
    choose,
    cudnn_attention,
    grouped_causal_mask,
)
from perpo_jax.models.decoder import grouped_attention
from perpo_jax.assemble import tiny_model_config
from perpo_jax.models.lora import apply_lora
from perpo_jax.scoring import list_logprobs
from perpo_jax.train.optim import make_optimizer
from perpo_jax.train.state import init_train_state, partition_model
from perpo_jax.train.step import build_train_step, traced_under_mesh

N_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # GQA: two query heads per kv head


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _valid(lengths, t):
    """[..., T] bool, right-padded to the given lengths."""
    return jnp.asarray(np.arange(t) < np.asarray(lengths)[..., None])


def _compare(impl, q, k, v, valid, prefix_kv=None, prefix_mask=None, tol=1e-5):
    """`grouped_attention` with `impl` vs the XLA path: outputs on real-token rows, gradients of
    q, k, v (and prefix k, v) for a cotangent on real-token rows; and every output and gradient
    finite for a cotangent on every row (padding rows included)."""
    rng = np.random.default_rng(7)
    real = valid[..., None, None]
    weights_real = _normal(rng, *q.shape) * real
    weights_all = _normal(rng, *q.shape)

    args = (q, k, v) + (() if prefix_kv is None else tuple(prefix_kv))

    @functools.partial(jax.jit, static_argnums=0)
    def run(name, *args):
        def attend(q, k, v, *pre):
            prefix = None if not pre else (pre[0], pre[1], prefix_mask)
            return grouped_attention(q, k, v, CausalOwnMask(valid, name), prefix)
        out, vjp = jax.vjp(attend, *args)
        return out, vjp(weights_real), vjp(weights_all)

    out_ref, grads_ref, _ = run("xla", *args)
    out, grads, grads_all = run(impl, *args)
    names = ("q", "k", "v", "k_prefix", "v_prefix")
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, out_ref, 0), atol=tol)
    for name, g, g_ref in zip(names, grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=tol, err_msg=name)
    assert np.isfinite(out).all()
    for name, g in zip(names, grads_all):
        assert np.isfinite(g).all(), name


def test_splash_prefill_matches_xla():
    """G = 1, no prefix (prefill): causal + key padding; T = 40 is padded to the kernel's 128;
    row 0 right-padded, row 1 a list with no real token."""
    rng = np.random.default_rng(0)
    b, t = 2, 40
    q = _normal(rng, b, 1, t, N_HEADS, HEAD_DIM)
    k, v = (_normal(rng, b, 1, t, KV_HEADS, HEAD_DIM) for _ in range(2))
    _compare("splash", q, k, v, _valid([[29], [0]], t))


def test_splash_candidates_with_shared_prefix_match_xla():
    """Candidate scoring: G = 3 groups per row over a shared prefix with its own padding
    (right-padded, left-padded, empty), ragged / empty candidates and a list with nothing real."""
    rng = np.random.default_rng(1)
    b, g, t, p = 3, 3, 8, 12
    q = _normal(rng, b, g, t, N_HEADS, HEAD_DIM)
    k, v = (_normal(rng, b, g, t, KV_HEADS, HEAD_DIM) for _ in range(2))
    prefix_kv = tuple(_normal(rng, b, p, KV_HEADS, HEAD_DIM) for _ in range(2))
    prefix_mask = np.ones((b, p), bool)
    prefix_mask[0, 9:] = False
    prefix_mask[1, :3] = False
    prefix_mask[2] = False
    valid = _valid([[8, 5, 0], [3, 8, 1], [0, 0, 0]], t)
    _compare("splash", q, k, v, valid, prefix_kv, jnp.asarray(prefix_mask))


def test_grouped_causal_mask_is_the_dense_mask_of_the_xla_path():
    """The kernel's static mask, restricted to real rows/columns, is CausalOwnMask.dense() per
    group plus every prefix column; rows past G·T see themselves (never an empty row)."""
    g, t, lq, lp = 3, 5, 128, 128
    mask = grouped_causal_mask(g, t, lq, lp)
    dense = np.asarray(CausalOwnMask(jnp.ones((1, g, t), bool)).dense())[0]  # [G, T, T]
    for group in range(g):
        rows = slice(group * t, (group + 1) * t)
        np.testing.assert_array_equal(mask[rows, rows], dense[group])
        assert not mask[rows, : group * t].any() and not mask[rows, (group + 1) * t: lq].any()
    assert mask[: g * t, lq:].all() and not mask[g * t:, lq:].any()
    assert mask[np.arange(lq), np.arange(lq)].all()


def test_cudnn_argument_mapping_matches_xla():
    """cuDNN's arguments (groups folded into the batch, causal, lengths from right-padded
    validity) through jax.nn.dot_product_attention's XLA implementation (cuDNN itself needs a
    GPU): the same numbers as the XLA core on real rows, values and gradients."""
    rng = np.random.default_rng(2)
    b, g, t = 2, 2, 12
    q = _normal(rng, b, g, t, N_HEADS, HEAD_DIM)
    k, v = (_normal(rng, b, g, t, KV_HEADS, HEAD_DIM) for _ in range(2))
    valid = _valid([[12, 7], [0, 3]], t)
    real = valid[..., None, None]
    weights = _normal(rng, *q.shape) * real

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return (out * weights).sum(), out

    def mapped(q, k, v):
        return cudnn_attention(q, k, v, valid, implementation="xla")

    def xla(q, k, v):
        return grouped_attention(q, k, v, CausalOwnMask(valid, "xla"))

    (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(mapped, *a), (0, 1, 2),
                                                 has_aux=True))(q, k, v)
    (_, ref), grads_ref = jax.jit(jax.value_and_grad(lambda *a: loss(xla, *a), (0, 1, 2),
                                                     has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5)
    for name, a, r in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(a, r, atol=1e-5, err_msg=name)
    assert np.isfinite(out).all()


# ----------------------------------------------------------------------------- choosing


@pytest.fixture(scope="module")
def v5e_devices():
    """The 8 TPU v5e devices of a v5e:2x4 topology, described by libtpu on this CPU host."""
    pytest.importorskip("libtpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x4", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
    return topology.devices


def test_choose_follows_the_target_platform(v5e_devices):
    f32, bf16 = jnp.float32, jnp.bfloat16
    kw = dict(has_prefix=False, dtype=bf16, head_dim=128)
    # this process: CPU, no mesh
    assert choose("auto", **kw) == "xla"
    assert choose("xla", **kw) == "xla"
    assert choose("splash", **kw) == "splash"  # interpret mode off TPU
    with pytest.raises(ValueError, match="model.attention=cudnn needs a GPU"):
        choose("cudnn", **kw)
    with pytest.raises(ValueError, match="model.attention: 'flash'"):
        choose("flash", **kw)
    # compiling for TPU from this host: the mesh's devices decide, not the default backend
    with jax.sharding.use_abstract_mesh(make_mesh((2, 2, 2), devices=v5e_devices).abstract_mesh):
        assert choose("auto", **kw) == "splash"
        assert choose("auto", **dict(kw, has_prefix=True, dtype=f32)) == "splash"
    gpu = AbstractMesh((2,), ("data",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100", num_cores=None, platform="gpu"))
    with jax.sharding.use_abstract_mesh(gpu):
        assert choose("auto", **kw) == "cudnn"
        assert choose("auto", **dict(kw, has_prefix=True)) == "xla"  # needs a dense bias
        assert choose("auto", **dict(kw, dtype=f32)) == "xla"  # cuDNN flash: bf16 / fp16
        assert choose("cudnn", **dict(kw, head_dim=100)) == "xla"
        with pytest.raises(ValueError, match="splash is a TPU kernel"):
            choose("splash", **kw)


def test_model_attention_config_key_reaches_the_decoder():
    cfg = config_from_dict({"model": {"attention": "splash"}})
    processor = types.SimpleNamespace(tokenizer=[0] * 300, image_token_id=299)
    assert tiny_model_config(cfg, processor).text.attention == "splash"
    assert config_from_dict({}).model.attention == "auto"
    with pytest.raises(ConfigError, match=r"model\.attention: 'flash' is not one of"):
        config_from_dict({"model": {"attention": "flash"}})


# ----------------------------------------------------------------------------- whole programs


def test_train_step_aot_compiles_with_the_splash_kernel_for_v5e(v5e_devices):
    """The real train step (policy + in-step reference, LoRA, bf16) lowered from
    ShapeDtypeStructs and compiled by libtpu for v5e-8 with model.attention=splash: each of
    the 4 attention calls of the forward passes (prefill and candidate extend, policy and
    reference) and the dq + dkv kernels of the policy's 2 backward passes is a Mosaic call."""
    cfg = tiny_llava_config(256, hidden_size=64, num_layers=1, image_size=16, patch_size=8,
                            dtype="bfloat16")
    cfg = cfg.replace(text=cfg.text.replace(attention="splash"))
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)

    def make():
        model = LlavaModel(cfg, rngs=nnx.Rngs(0))
        apply_lora(model, lora, nnx.Rngs(1))
        return model

    parts = partition_model(nnx.eval_shape(make), lora)
    optimizer, schedule = make_optimizer(OptimConfig(), 10)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), parts.params)
    mesh = make_mesh((2, 2, 2), devices=v5e_devices)
    step = build_train_step(parts.graphdef, state, parts.frozen, parts.reference,
                            loss_cfg=LossConfig(), optimizer=optimizer, schedule=schedule,
                            mesh=mesh)
    b, p, k, r = 8, 40, 4, 9
    sds = jax.ShapeDtypeStruct
    batch = {"prompt_ids": sds((b, p), jnp.int32), "prompt_mask": sds((b, p), jnp.bool_),
             "response_ids": sds((b, k, r), jnp.int32), "response_mask": sds((b, k, r), jnp.bool_),
             "rewards": sds((b, k), jnp.float32), "list_mask": sds((b, k), jnp.bool_),
             "pixel_values": sds((b, 3, 16, 16), jnp.float32)}
    compiled = step.lower(state, parts.frozen, parts.reference, batch).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 4 + 2 * 2


def test_scoring_with_splash_equals_xla_on_a_tiny_llava():
    """list_logprobs of a tiny LLaVA (image, ragged prompts, a padded candidate) and its
    parameter gradients, jitted over a (data 2, tensor 2) CPU mesh so the kernels run inside
    shard_map (batch and kv heads split): splash (interpret) == xla."""
    mesh = make_mesh((2, 1, 2), devices=jax.devices()[:4])
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3)), jnp.float32)
    results = {}
    for impl in ("xla", "splash"):
        cfg = tiny_llava_config(256, hidden_size=32, num_layers=1, image_size=16, patch_size=8)
        cfg = cfg.replace(text=cfg.text.replace(attention=impl))
        graphdef, params = nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(0)))
        batch = make_batch(cfg, with_image=True, b=2, k=3, r=5)

        def objective(params, batch):
            return (list_logprobs(nnx.merge(graphdef, params), batch) * weights).sum()

        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        batch = {name: jax.device_put(x, batch_sharding(mesh, x.ndim))
                 for name, x in batch.items()}
        step = jax.jit(traced_under_mesh(jax.value_and_grad(objective), mesh))
        results[impl] = step(params, batch)
    (loss, grads), (loss_ref, grads_ref) = results["splash"], results["xla"]
    np.testing.assert_allclose(loss, loss_ref, atol=1e-5)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    for (path, g), g_ref in zip(leaves, jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_bench_attention_aot_runs_at_a_toy_size(v5e_devices, monkeypatch, capsys):
    """bench/attention_aot.py: one JSON object; the splash variant's program holds the 6 Mosaic
    calls (prefill and extend: forward, dq, dkv), the xla one none. Figures are not asserted."""
    script = str(Path(__file__).resolve().parents[1] / "bench" / "attention_aot.py")
    monkeypatch.setattr(sys, "argv", ["attention_aot.py", "--prompt", "64", "--candidates", "2",
                                      "--response", "9", "--heads", "4", "--head-dim", "16"])
    runpy.run_path(script, run_name="__main__")
    out = json.loads(capsys.readouterr().out)
    assert out["device_kind"] == "TPU v5 lite"
    assert (out["xla"]["mosaic_calls"], out["splash"]["mosaic_calls"]) == (0, 6)
    for impl in ("xla", "splash"):
        assert out[impl]["residual_bytes"] > 0 and out[impl]["peak_bytes"] > 0
