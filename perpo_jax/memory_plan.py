"""`perpo-jax plan`: will this recipe fit a slice? Parameter counts and per-device bytes.

    plan = memory_plan(cfg, devices=8, hbm_gib=16.0, compile_step=True)
    plan["params_total"], plan["per_device_bytes"], plan["fits"]

Nothing is allocated: the model is built with `nnx.eval_shape` from `config.json` of
`model.hf_path` (no weights read), LoRA is attached abstractly, and the ONE jitted train step
of `train/step.py` is lowered on `jax.ShapeDtypeStruct`s and compiled for the configured mesh;
`compiled.memory_analysis()` gives XLA's own per-device figures. Beside them an analytic
breakdown: exact per-device bytes of base weights, trainable weights, optimizer state and
gradients from the real sharding rules (`mesh.state_shardings`), and an estimate of the
activations of one step at the configured list shape ([lists, K candidates, R tokens] with
a P-token prompt), prefix-shared (`train.shared_prefix`) or naive.

Compiling needs `devices` devices in this process (on CPU: XLA_FLAGS
--xla_force_host_platform_device_count, which `perpo-jax plan` sets itself); the analytic
breakdown needs none (an `AbstractMesh`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from perpo_jax.config import Config, ConfigError
from perpo_jax.mesh import MESH_AXES, state_shardings
from perpo_jax.models.config import as_jnp_dtype

GIB = 1024 ** 3
PROMPT_TEXT_TOKENS = 64  # question + template around the image tokens (plan's default)


# ----------------------------------------------------------------------------- model


def model_config(cfg: Config, vocab_size: int | None = None):
    """LlavaConfig from `model.hf_path`/config.json only (no weights), else the tiny spec."""
    from perpo_jax.hf.load import read_config

    if cfg.model.hf_path is not None:
        config = read_config(cfg.model.hf_path, as_jnp_dtype(cfg.model.dtype))
    else:
        from perpo_jax.models import tiny_llava_config
        from perpo_jax.models.from_config import DEFAULT_VOCAB_SIZE, tiny_geometry, tiny_kwargs

        kwargs = tiny_kwargs(cfg)
        vocab = vocab_size or kwargs.pop("vocab_size", DEFAULT_VOCAB_SIZE)
        kwargs.pop("vocab_size", None)
        kwargs["image_size"] = tiny_geometry(cfg)[0]
        config = tiny_llava_config(vocab, dtype=cfg.model.dtype,
                                   param_dtype=cfg.model.param_dtype, **kwargs)
    return config.replace(text=config.text.replace(remat=cfg.model.remat))


def _count(state) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


def abstract_model(cfg: Config, config):
    """(abstract model with LoRA attached as the trainer does, base parameter count)."""
    from perpo_jax.models import build_model
    from perpo_jax.models.lora import LoRAParam, apply_lora

    def with_lora():
        model = build_model(config, rngs=nnx.Rngs(0))
        if cfg.lora.enabled:
            lora = dataclasses.replace(cfg.lora, dropout=0.0) if cfg.train.disable_dropout else cfg.lora
            apply_lora(model, lora, nnx.Rngs(cfg.train.seed),
                       param_dtype=as_jnp_dtype(cfg.model.param_dtype))
        return model

    model = nnx.eval_shape(with_lora)
    # LoRAParam is an nnx.Param: the base count is every Param but the adapters
    return model, _count(nnx.state(model, nnx.Param)) - _count(nnx.state(model, LoRAParam))


def abstract_parts(cfg: Config, model):
    """(graphdef, params, frozen, reference) of an abstract model, in their storage dtypes
    (`train.state.partition_model` + `with_storage_dtypes`, on ShapeDtypeStructs)."""
    from perpo_jax.models.lora import LoRAParam, trainable_filter

    lora_cfg = cfg.lora if cfg.lora.enabled else None
    graphdef, params, frozen = nnx.split(model, trainable_filter(lora_cfg), ...)
    _, reference = nnx.split_state(params, LoRAParam, ...)

    def cast(dtype):
        def one(x):
            return (jax.ShapeDtypeStruct(x.shape, dtype)
                    if jnp.issubdtype(x.dtype, jnp.floating) else x)
        return lambda tree: jax.tree.map(one, tree)

    trainable = as_jnp_dtype(cfg.model.param_dtype)
    return (graphdef, cast(trainable)(params), cast(as_jnp_dtype(cfg.model.dtype))(frozen),
            cast(trainable)(reference))


# ----------------------------------------------------------------------------- mesh + batch


def mesh_shape(shape, devices: int) -> tuple[int, int, int]:
    """`mesh.shape` (one entry may be -1) resolved for `devices` devices."""
    shape = [int(s) for s in shape]
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if devices % known:
            raise ConfigError(f"mesh.shape {shape} does not divide {devices} devices")
        shape[shape.index(-1)] = devices // known
    if math.prod(shape) != devices:
        raise ConfigError(f"mesh.shape {shape} has {math.prod(shape)} slots, not {devices} devices")
    return tuple(shape)


def batch_shape(cfg: Config, config, mesh_dims, prompt_length: int | None = None) -> dict:
    """Global step-batch ShapeDtypeStructs at the configured list shape."""
    data, fsdp, _ = mesh_dims
    unit = data * fsdp * cfg.optim.grad_accum
    lists = -(-cfg.train.lists_per_step // unit) * unit
    k = cfg.train.num_candidates
    r = (cfg.train.max_response_length if cfg.train.mode == "offline"
         else cfg.sampling.max_new_tokens)
    if prompt_length is None:
        prompt_length = config.num_image_tokens + PROMPT_TEXT_TOKENS
    p = min(-(-prompt_length // 32) * 32, cfg.train.max_length - r)
    v = config.vision
    s = jax.ShapeDtypeStruct
    batch = {"pixel_values": s((lists, v.num_channels, v.image_size, v.image_size), jnp.float32),
             "prompt_ids": s((lists, p), jnp.int32), "prompt_mask": s((lists, p), jnp.bool_),
             "response_ids": s((lists, k, r), jnp.int32),
             "response_mask": s((lists, k, r), jnp.bool_),
             "rewards": s((lists, k), jnp.float32), "list_mask": s((lists, k), jnp.bool_),
             "target_ids": s((lists, r), jnp.int32), "target_mask": s((lists, r), jnp.bool_)}
    if cfg.loss.name != "sft" and cfg.train.precompute_ref:
        batch["ref_logps"] = s((lists, k), jnp.float32)
    return batch


# ----------------------------------------------------------------------------- analytic


def _leaf_bytes(leaf) -> int:
    try:
        return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    except TypeError:  # typed PRNG keys
        return math.prod(leaf.shape) * 8


def tree_sharded_bytes(tree, shardings) -> int:
    """Bytes of one device's shards of every leaf of `tree` under `shardings` (same tree)."""
    total = 0
    leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for leaf, sharding in zip(jax.tree.leaves(tree), leaves):
        shard = sharding.shard_shape(leaf.shape)
        total += _leaf_bytes(leaf) * math.prod(shard) // max(math.prod(leaf.shape), 1)
    return int(total)


def sharded_bytes(tree, mesh) -> int:
    """Bytes of one device's shards of every leaf of an (abstract) nnx.State on `mesh`."""
    return tree_sharded_bytes(tree, state_shardings(tree, mesh))


def activation_bytes(cfg: Config, config, batch: dict, mesh_dims, *, shared_prefix: bool) -> dict:
    """Estimate of one step's live activations per device (saved for backward + the largest
    transient working set). Decoder layers: ~(7h + 2·kv + 4f + 7r) values per token in the
    compute dtype, attention probabilities in float32; with `model.remat` only each layer's
    input is kept and one layer is live at a time. Plus the response logits (float32, value
    and gradient) and the vision tower's output."""
    data, fsdp, tensor = mesh_dims
    b = batch["prompt_ids"].shape[0] / (data * fsdp)  # lists per device
    p = batch["prompt_ids"].shape[1]
    _, k, r = batch["response_ids"].shape
    t = config.text
    act = np.dtype(as_jnp_dtype(cfg.model.dtype)).itemsize
    heads = t.num_heads / (tensor if t.num_heads % tensor == 0 else 1)
    kv = t.num_kv_heads * t.head_dim
    lora_r = cfg.lora.rank if cfg.lora.enabled else 0
    if shared_prefix:
        tokens = b * (p + k * r)
        scores = b * heads * (p * p + k * r * (p + r))
    else:
        tokens = b * k * (p + r)
        scores = b * k * heads * (p + r) ** 2
    per_token = (7 * t.hidden_size + 2 * kv + 4 * t.intermediate_size + 7 * lora_r) * act
    layer = tokens * per_token + scores * 4
    if t.remat:
        decoder = t.num_layers * tokens * t.hidden_size * act + layer
    else:
        decoder = t.num_layers * layer
    logits = b * k * r * t.vocab_size * 4 * 2
    vision = b * config.vision.num_positions * config.vision.hidden_size * act * 4
    return {"decoder": int(decoder), "logits": int(logits), "vision": int(vision),
            "total": int(decoder + logits + vision)}


# ----------------------------------------------------------------------------- compiled


def compiled_memory(cfg: Config, parts, batch: dict, devices: int, shared_prefix: bool) -> dict:
    """XLA's per-device memory of the compiled train step (needs `devices` local devices)."""
    from perpo_jax.mesh import make_mesh
    from perpo_jax.train.optim import make_optimizer
    from perpo_jax.train.state import init_train_state
    from perpo_jax.train.step import build_train_step

    if len(jax.devices()) < devices:
        raise ValueError(f"compiling for {devices} devices needs {devices} devices in this "
                         f"process, there are {len(jax.devices())} (use --no-compile)")
    graphdef, params, frozen, reference = parts
    mesh = make_mesh(cfg.mesh.shape, devices=jax.devices()[:devices])
    optimizer, schedule = make_optimizer(cfg.optim, 1000)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer, cfg.train.seed), params)
    step = build_train_step(graphdef, state, frozen, reference, loss_cfg=cfg.loss,
                            optimizer=optimizer, schedule=schedule, mesh=mesh,
                            grad_accum=cfg.optim.grad_accum, shared_prefix=shared_prefix)
    stats = step.lower(state, frozen, reference, batch).compile().memory_analysis()
    out = {name: int(getattr(stats, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "temp", "alias", "generated_code")}
    # arguments + temporaries live at once; donated outputs reuse their arguments' buffers
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# ----------------------------------------------------------------------------- the plan


def memory_plan(cfg: Config, *, devices: int, hbm_gib: float, compile_step: bool = True,
                prompt_length: int | None = None) -> dict:
    """The plan as one JSON-able dict (see module docstring)."""
    config = model_config(cfg)
    model, base_count = abstract_model(cfg, config)
    parts = abstract_parts(cfg, model)
    graphdef, params, frozen, reference = parts
    from perpo_jax.models.lora import LoRAParam

    lora_count = _count(nnx.state(model, LoRAParam))
    dims = mesh_shape(cfg.mesh.shape, devices)
    mesh = AbstractMesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    batch = batch_shape(cfg, config, dims, prompt_length)
    from perpo_jax.train.optim import make_optimizer
    from perpo_jax.train.state import init_train_state, train_state_shardings

    optimizer, _ = make_optimizer(cfg.optim, 1000)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), params)
    trainable = sharded_bytes(params, mesh)
    opt_bytes = tree_sharded_bytes(state.opt_state,
                                   train_state_shardings(state, mesh).opt_state)
    per_device = {"base_params": sharded_bytes(frozen, mesh) + sharded_bytes(reference, mesh),
                  "trainable_params": trainable, "optimizer_state": opt_bytes,
                  "gradients": trainable}
    shape = {"lists_per_step": batch["prompt_ids"].shape[0],
             "candidates": batch["response_ids"].shape[1],
             "response_tokens": batch["response_ids"].shape[2],
             "prompt_tokens": batch["prompt_ids"].shape[1]}
    by_mode = {}
    for mode, shared in (("prefix_shared", True), ("naive", False)):
        acts = activation_bytes(cfg, config, batch, dims, shared_prefix=shared)
        entry = {"activations_analytic": acts,
                 "total_analytic": sum(per_device.values()) + acts["total"]}
        if compile_step and shared == cfg.train.shared_prefix:
            entry["compiled"] = compiled_memory(cfg, parts, batch, devices, shared)
        by_mode[mode] = entry
    chosen = by_mode["prefix_shared" if cfg.train.shared_prefix else "naive"]
    per_device["activations"] = chosen["activations_analytic"]["total"]
    peak = chosen["compiled"]["peak"] if "compiled" in chosen else chosen["total_analytic"]
    return {
        "model": cfg.model.hf_path or "tiny",
        "params_total": base_count,
        "params_lora": lora_count,
        "params_trainable": _count(params),
        "devices": devices,
        "mesh": dict(zip(MESH_AXES, dims)),
        "list_shape": shape,
        "shared_prefix": cfg.train.shared_prefix,
        "per_device_bytes": per_device,
        "modes": by_mode,
        "peak_bytes_per_device": int(peak),
        "peak_source": "compiled" if "compiled" in chosen else "analytic",
        "hbm_gib": hbm_gib,
        "fits": bool(peak <= hbm_gib * GIB),
    }


def format_plan(plan: dict) -> str:
    """Human-readable summary of `memory_plan`'s dict."""
    def gib(n):
        return f"{n / GIB:8.2f} GiB"

    lines = [f"model {plan['model']}: {plan['params_total']:,} parameters, "
             f"{plan['params_trainable']:,} trainable ({plan['params_lora']:,} LoRA)",
             f"mesh {plan['mesh']} on {plan['devices']} devices; step of "
             f"{plan['list_shape']['lists_per_step']} lists x {plan['list_shape']['candidates']} "
             f"candidates x {plan['list_shape']['response_tokens']} tokens, prompt "
             f"{plan['list_shape']['prompt_tokens']} tokens",
             "per device (analytic):"]
    for name, n in plan["per_device_bytes"].items():
        lines.append(f"  {name:18s}{gib(n)}")
    for mode, entry in plan["modes"].items():
        text = f"  {mode:14s} total (analytic) {gib(entry['total_analytic'])}"
        if "compiled" in entry:
            text += f"   compiled peak {gib(entry['compiled']['peak'])}"
        lines.append(text)
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"peak {gib(plan['peak_bytes_per_device']).strip()} per device "
                 f"({plan['peak_source']}): {verdict} in {plan['hbm_gib']} GiB")
    return "\n".join(lines)
