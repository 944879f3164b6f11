"""`perpo-jax plan`: will this recipe fit a slice? Parameter counts, and what XLA says.

    plan = memory_plan(cfg, tpu="v5e-8")                    # XLA's TPU compiler, on this host
    plan = memory_plan(cfg, devices=8, hbm_gib=16.0)         # N CPU devices of this process
    plan["fits"], plan["programs"]["train_step"]["peak_bytes"]

Nothing is allocated: the model is built with `nnx.eval_shape` from `config.json` of
`model.hf_path` (no weights read), LoRA is attached abstractly, the parts are cast to the
recipe's storage dtypes (frozen base in `model.dtype`, trainable weights and AdamW in
`model.param_dtype`), and the real programs of a round are lowered on
`jax.ShapeDtypeStruct`s carrying their shardings over the configured mesh and compiled
(`compile_stats`): the train step (`train.step.build_train_step`), the reference log-probs
(`build_ref_logps`, when `train.precompute_ref`) and, when the round samples, the sampler's
prefill and one decode step (`sampling.prefill_program` / `decode_step_program`). Shapes are
the round's: the step batch padded as the trainer pads it (`train.loop.step_batch_lists`),
`sampling.prompts_per_round` prompts for the sampler.

`fits` comes from the compiler: a compile-time out-of-memory is `fits: False` with its
message. A program other than the step also needs room for what stays resident beside it
(the optimizer state, the reference copy, ...; `beside_bytes`, exact from the shardings),
so it fits when peak + beside <= HBM. `per_device_bytes` are exact bytes of the weights,
optimizer state and gradients per device from the sharding rules; activations have no
analytic estimate (it was 2.5-6x low against XLA): without a compile
(`compile_programs=False`) the plan says `fits: None` unless those alone exceed HBM.
"""
from __future__ import annotations

import dataclasses
import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from perpo_jax import flop_model, sampling, tpu_topology
from perpo_jax.compile_stats import compile_stats
from perpo_jax.config import Config, ConfigError
from perpo_jax.data.batching import bucketed
from perpo_jax.hf.load import read_config
from perpo_jax.mesh import MESH_AXES, logical_sharding, make_mesh, state_shardings
from perpo_jax.models import build_model, tiny_llava_config
from perpo_jax.models.config import as_jnp_dtype
from perpo_jax.models.layers import ShapeOnlyKeys
from perpo_jax.assemble import (DEFAULT_VOCAB_SIZE, tiny_geometry, tiny_kwargs,
                                          with_model_settings)
from perpo_jax.models.lora import LoRAParam, apply_lora, trainable_filter
from perpo_jax.train import rounds
from perpo_jax.train.loop import step_batch_lists
from perpo_jax.train.optim import make_optimizer
from perpo_jax.train.state import (TrainState, init_train_state, reference_state,
                                   train_state_shardings)
from perpo_jax.train.step import build_ref_logps, build_train_step, uses_reference

GIB = 1024 ** 3
PROMPT_TEXT_TOKENS = 64  # question + template around the image tokens (plan's default)
LARGEST_BUFFERS = 8  # buffers listed per program


# ----------------------------------------------------------------------------- model


def model_config(cfg: Config, vocab_size: int | None = None):
    """LlavaConfig from `model.hf_path`/config.json only (no weights), else the tiny spec."""
    if cfg.model.hf_path is not None:
        config = read_config(cfg.model.hf_path, as_jnp_dtype(cfg.model.dtype))
    else:
        kwargs = tiny_kwargs(cfg)
        vocab = vocab_size or kwargs.pop("vocab_size", DEFAULT_VOCAB_SIZE)
        kwargs.pop("vocab_size", None)
        kwargs["image_size"] = tiny_geometry(cfg)[0]
        config = tiny_llava_config(vocab, dtype=cfg.model.dtype,
                                   param_dtype=cfg.model.param_dtype, **kwargs)
    return with_model_settings(cfg, config)


def _count(state) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


def abstract_model(cfg: Config, config):
    """(abstract model with LoRA attached as the trainer does, base parameter count)."""

    def with_lora():
        model = build_model(config, rngs=ShapeOnlyKeys(0))
        if cfg.lora.enabled:
            lora = dataclasses.replace(cfg.lora, dropout=0.0) if cfg.train.disable_dropout else cfg.lora
            apply_lora(model, lora, ShapeOnlyKeys(cfg.train.seed),
                       param_dtype=as_jnp_dtype(cfg.model.param_dtype))
        return model

    model = nnx.eval_shape(with_lora)
    # LoRAParam is an nnx.Param: the base count is every Param but the adapters
    return model, _count(nnx.state(model, nnx.Param)) - _count(nnx.state(model, LoRAParam))


def abstract_parts(cfg: Config, model):
    """(graphdef, params, frozen, reference) of an abstract model, in their storage dtypes
    (`train.state.partition_model` + `with_storage_dtypes`, on ShapeDtypeStructs)."""
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


def prompt_width(cfg: Config, config, prompt_length: int | None = None) -> int:
    """P: the prompt (image tokens + text) padded as the trainer pads it, within max_length."""
    if prompt_length is None:
        prompt_length = config.num_image_tokens + PROMPT_TEXT_TOKENS
    return min(bucketed(prompt_length), cfg.train.max_length - rounds.response_length(cfg))


def batch_shape(cfg: Config, config, mesh_dims, prompt_length: int | None = None) -> dict:
    """Global step-batch ShapeDtypeStructs at the configured list shape."""
    data, fsdp, _ = mesh_dims
    lists = step_batch_lists(cfg, data, fsdp)
    k = 2 if rounds.uses_pairs(cfg) else cfg.train.num_candidates  # M3PO: one pair per list
    r = rounds.response_length(cfg)
    p = prompt_width(cfg, config, prompt_length)
    v = config.vision
    s = jax.ShapeDtypeStruct
    batch = {"pixel_values": s((lists, v.num_channels, v.image_size, v.image_size), jnp.float32),
             "prompt_ids": s((lists, p), jnp.int32), "prompt_mask": s((lists, p), jnp.bool_),
             "response_ids": s((lists, k, r), jnp.int32),
             "response_mask": s((lists, k, r), jnp.bool_),
             "rewards": s((lists, k), jnp.float32), "list_mask": s((lists, k), jnp.bool_),
             "target_ids": s((lists, r), jnp.int32), "target_mask": s((lists, r), jnp.bool_)}
    if uses_reference(cfg.loss.name) and cfg.train.precompute_ref:
        batch["ref_logps"] = s((lists, k), jnp.float32)
    return batch


# ----------------------------------------------------------------------------- exact bytes


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


def resident_bytes(parts, state: TrainState, mesh) -> dict:
    """Per-device bytes of what a run keeps on the chips between programs (exact)."""
    _, params, frozen, reference = parts
    shardings = train_state_shardings(state, mesh)
    return {"params": sharded_bytes(params, mesh),
            "opt_state": tree_sharded_bytes(state.opt_state, shardings.opt_state),
            "counters": tree_sharded_bytes((state.step, state.rng, state.skipped),
                                           (shardings.step, shardings.rng, shardings.skipped)),
            "frozen": sharded_bytes(frozen, mesh), "reference": sharded_bytes(reference, mesh)}


# ----------------------------------------------------------------------------- programs


def _placed(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a prefix tree of NamedShardings)."""
    def one(sharding, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            sub)

    return jax.tree.map(one, shardings, tree, is_leaf=lambda n: isinstance(n, NamedSharding))


def _batch_placed(tree, mesh):
    """Batch-like arrays: leading dim over (data, fsdp) as `sampling` places them."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=logical_sharding(("batch",) + (None,) * (x.ndim - 1),
                                                    x.shape, mesh)), tree)


def _replicated(tree, mesh):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec())), tree)


def _step_programs(cfg: Config, parts, state, batch: dict, mesh):
    """(name, lowered, resident parts among its arguments) of the step and the reference."""
    graphdef, params, frozen, reference = parts
    optimizer, schedule = make_optimizer(cfg.optim, 1000)
    step = build_train_step(graphdef, state, frozen, reference, loss_cfg=cfg.loss,
                            optimizer=optimizer, schedule=schedule, mesh=mesh,
                            grad_accum=cfg.optim.grad_accum, shared_prefix=cfg.train.shared_prefix)
    yield "train_step", step.lower(state, frozen, reference, batch), None
    if uses_reference(cfg.loss.name) and cfg.train.precompute_ref:
        ref = build_ref_logps(graphdef, params, frozen, reference, mesh=mesh,
                              shared_prefix=cfg.train.shared_prefix)
        ref_batch = {k: v for k, v in batch.items() if k != "ref_logps"}
        yield ("ref_logps", ref.lower(params, frozen, reference, ref_batch),
               ("params", "frozen", "reference"))


def _sampler_args(cfg: Config, config, parts, batch: dict, mesh):
    """(graphdef, spec, prefill arguments, resident parts they hold) of a round's sampling."""
    graphdef, params, frozen, reference = parts
    if cfg.sampling.from_reference:
        params = jax.eval_shape(reference_state, params, reference)
        held = ("frozen", "reference")  # the zeroed adapters are made for it
    else:
        held = ("params", "frozen")
    full_graphdef, state = nnx.split(nnx.merge(graphdef, params, frozen))
    b, k = cfg.sampling.prompts_per_round, cfg.sampling.num_samples
    p = batch["prompt_ids"].shape[1]
    greedy = float(cfg.sampling.temperature) == 0.0
    eos = config.text.eos_token_id
    eos_ids = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
    spec = sampling.SamplerSpec(k, cfg.sampling.max_new_tokens, greedy, eos_ids, 0, mesh,
                                True, (int(config.image_token_id),))
    prompts = {"prompt_ids": jax.ShapeDtypeStruct((b, p), jnp.int32),
               "prompt_mask": jax.ShapeDtypeStruct((b, p), jnp.bool_)}
    pixels = jax.ShapeDtypeStruct((b,) + batch["pixel_values"].shape[1:], jnp.float32)
    keys = jax.eval_shape(lambda: sampling.sample_keys(jax.random.key(0), b, k))
    scalars = _replicated((jax.ShapeDtypeStruct((), jnp.float32),) * 2, mesh)
    args = (_placed(state, state_shardings(state, mesh)), *_batch_placed(
        (prompts["prompt_ids"], prompts["prompt_mask"]), mesh),
        {"pixel_values": _batch_placed(pixels, mesh)}, _replicated(keys, mesh), *scalars)
    return full_graphdef, spec, args, held


def _decode_args(prefill_args, prefill_compiled, prefill_lowered, mesh):
    """The decode step's arguments: prefill's outputs with the shardings XLA gave them (or
    replicated, when prefill itself did not compile)."""
    outs = prefill_lowered.out_info
    if prefill_compiled is not None:
        shardings = prefill_compiled.output_shardings
        outs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            outs, shardings)
    else:
        outs = _replicated(outs, mesh)
    prefix, prompt_len, carry = outs
    state, _, _, _, keys, temperature, top_p = prefill_args
    return state, prefix, prompt_len, keys, temperature, top_p, carry


def model_flops(cfg: Config, config, batch: dict) -> dict:
    """{program: FLOPs it executes, whole slice} from `flop_model`: XLA's `cost_analysis()`
    counts a scanned loop body once (the layers are a scan), so its flops undercount the
    step ~L-fold and stand for nothing."""
    lists, k, r = batch["response_ids"].shape
    dims = flop_model.model_dims(config, prompt=batch["prompt_ids"].shape[1], response=r,
                                 candidates=k)
    shared, lora = cfg.train.shared_prefix, cfg.lora.rank if cfg.lora.enabled else 0
    step = flop_model.train_step_flops(
        dims, lists=lists, shared=shared, train="lora" if lora else "full", lora_rank=lora,
        train_projector=bool(cfg.lora.trainable), remat=cfg.model.remat, executed=True,
        reference_in_step=uses_reference(cfg.loss.name) and not cfg.train.precompute_ref)
    out = {"train_step": step["total"],
           "ref_logps": lists * flop_model.forward_flops(dims, shared=shared, executed=True)}
    if rounds.uses_sampling(cfg):
        prompts, samples = cfg.sampling.prompts_per_round, cfg.sampling.num_samples
        sample = flop_model.sampler_flops(dims, prompts=prompts, samples=samples,
                                          new_tokens=cfg.sampling.max_new_tokens,
                                          lora_rank=lora, executed=True)
        out["prefill"] = sample["prefill"]
        out["decode_step"] = (sample["decode_per_token"] or 0.0) * prompts * samples
    return out


def _program_entry(stats: dict, beside: int, hbm_bytes: float) -> dict:
    entry = dict(stats, beside_bytes=beside)
    if entry["fits"]:
        entry["fits"] = bool(entry["peak_bytes"] + beside <= hbm_bytes)
    return entry


def _release() -> None:
    """Drops jax's cached lowerings and executables: nothing is run, and a 7B program holds
    GBs of host memory (the v4-8 7B round was killed at 15 GB RSS on a 24 GB host without)."""
    jax.clear_caches()
    gc.collect()


def compile_round(cfg: Config, config, parts, batch: dict, mesh, *, platform: str,
                  hbm_bytes: float, progress=None) -> dict:
    """Every program of a round compiled for `mesh`: name -> `compile_stats` dict plus
    beside_bytes and fits (peak + beside within `hbm_bytes`). `progress(name, entry)` is
    called as each program is done (a 7B round takes many minutes)."""
    graphdef, params, frozen, reference = parts
    optimizer, _ = make_optimizer(cfg.optim, 1000)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer, cfg.train.seed), params)
    resident = resident_bytes(parts, state, mesh)
    total = sum(resident.values())
    programs = {}

    def done(name, stats, held):
        beside = 0 if held is None else total - sum(resident[h] for h in held)
        programs[name] = _program_entry(stats, beside, hbm_bytes)
        if progress is not None:
            progress(name, programs[name])

    for name, lowered, held in _step_programs(cfg, parts, state, batch, mesh):
        stats, _ = compile_stats(lowered, platform=platform, top=LARGEST_BUFFERS)
        del lowered
        _release()
        done(name, stats, held)
    if rounds.uses_sampling(cfg):
        full_graphdef, spec, args, held = _sampler_args(cfg, config, parts, batch, mesh)
        lowered = sampling.prefill_program(full_graphdef, spec).lower(*args)
        stats, compiled = compile_stats(lowered, platform=platform, top=LARGEST_BUFFERS)
        decode_args = _decode_args(args, compiled, lowered, mesh)
        del lowered, compiled
        _release()
        done("prefill", stats, held)
        decode = sampling.decode_step_program(full_graphdef, spec)
        stats, _ = compile_stats(decode.lower(*decode_args), platform=platform,
                                 top=LARGEST_BUFFERS)
        _release()
        done("decode_step", stats, held)
    return programs


# ----------------------------------------------------------------------------- the plan


def _target(devices: int | None, tpu: str | None, compile_programs: bool):
    """(target name, device kind, devices to compile for or None, count, HBM GiB or None)."""
    if tpu is not None:
        spec = tpu_topology.tpu_slice(tpu)
        devs = tpu_topology.slice_devices(spec) if compile_programs else None
        return spec.name, spec.device_kind, devs, spec.chips, spec.hbm_gib
    if devices is None or devices < 1:
        raise ConfigError("--devices must be >= 1 (or give --tpu NAME)")
    if not compile_programs:
        return "cpu", "cpu", None, devices, None
    have = jax.devices()
    if len(have) < devices:
        raise ConfigError(
            f"--devices {devices}: compiling for {devices} devices needs {devices} devices in "
            f"this process and it has {len(have)}; use --no-compile (weights and optimizer "
            f"bytes only) or --tpu NAME (XLA's TPU compiler for a slice, e.g. --tpu v5e-8)")
    return have[0].platform, have[0].device_kind, have[:devices], devices, None


def memory_plan(cfg: Config, *, devices: int | None = None, hbm_gib: float | None = None,
                tpu: str | None = None, compile_programs: bool = True,
                prompt_length: int | None = None, progress=None) -> dict:
    """The plan as one JSON-able dict (see module docstring). `tpu`: a slice name of
    `tpu_topology.TPU_SLICES` (its HBM per chip unless `hbm_gib` is given); else `devices`
    devices of this process (CPU), with `hbm_gib` per device. `progress`: see
    `compile_round`."""
    target, device_kind, devs, count, table_hbm = _target(devices, tpu, compile_programs)
    hbm_gib = table_hbm if hbm_gib is None else hbm_gib
    if hbm_gib is None or hbm_gib <= 0:
        raise ConfigError("--hbm-gib must be > 0 (memory per device in GiB)")
    config = model_config(cfg)
    model, base_count = abstract_model(cfg, config)
    parts = abstract_parts(cfg, model)
    _, params, frozen, reference = parts
    dims = mesh_shape(cfg.mesh.shape, count)
    abstract = AbstractMesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    batch = batch_shape(cfg, config, dims, prompt_length)
    optimizer, _ = make_optimizer(cfg.optim, 1000)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), params)
    resident = resident_bytes(parts, state, abstract)
    per_device = {"base_params": resident["frozen"] + resident["reference"],
                  "trainable_params": resident["params"], "optimizer_state": resident["opt_state"],
                  "gradients": resident["params"]}
    plan = {
        "model": cfg.model.hf_path or "tiny",
        "params_total": base_count,
        "params_lora": _count(nnx.state(model, LoRAParam)),
        "params_trainable": _count(params),
        "target": target,
        "device_kind": device_kind,
        "devices": count,
        "mesh": dict(zip(MESH_AXES, dims)),
        "list_shape": {"lists_per_step": batch["prompt_ids"].shape[0],
                       "candidates": batch["response_ids"].shape[1],
                       "response_tokens": batch["response_ids"].shape[2],
                       "prompt_tokens": batch["prompt_ids"].shape[1]},
        "shared_prefix": cfg.train.shared_prefix,
        "per_device_bytes": per_device,
        "hbm_gib": hbm_gib,
    }
    if devs is None:
        floor = sum(per_device.values())
        return dict(plan, programs={}, peak_bytes_per_device=int(floor),
                    peak_source="analytic_lower_bound", compile_seconds=0.0,
                    compiler_error=None, fits=False if floor > hbm_gib * GIB else None)
    mesh = make_mesh(cfg.mesh.shape, devices=devs)
    programs = compile_round(cfg, config, parts, batch, mesh, platform=devs[0].platform,
                             hbm_bytes=hbm_gib * GIB, progress=progress)
    for name, flops in model_flops(cfg, config, batch).items():
        if name in programs:
            programs[name]["model_flops_per_chip"] = flops / count
    peaks = [p["peak_bytes"] + p["beside_bytes"] for p in programs.values() if "peak_bytes" in p]
    errors = [f"{name}: {p['compiler_error']}" for name, p in programs.items()
              if p["compiler_error"]]
    return dict(plan, programs=programs, peak_bytes_per_device=int(max(peaks, default=0)),
                peak_source="compiled",
                compile_seconds=round(sum(p["compile_seconds"] for p in programs.values()), 2),
                compiler_error=errors[0] if errors else None,
                fits=all(p["fits"] for p in programs.values()))


# ----------------------------------------------------------------------------- text


def _gib(n) -> str:
    """Bytes in the largest binary unit that keeps them >= 1 (GiB at most)."""
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_buffers(buffers: list[dict]) -> list[str]:
    lines = []
    for b in buffers:
        count = f" x{b['count']}" if b["count"] > 1 else ""
        where = b["source"] or b["op_name"] or b["instruction"]
        lines.append(f"      {_gib(b['bytes']):>11}{count:5s} {b['kind']:8s} {b['shape']:28s} "
                     f"{where}")
    return lines


def program_line(name: str, p: dict) -> str:
    """One line about one compiled program (an entry of `plan["programs"]`)."""
    if p["compiler_error"]:
        return (f"{name}: does NOT fit ({p['compile_seconds']:.1f} s): "
                f"{p['compiler_error'].splitlines()[0]}")
    flops = ""
    if p.get("model_flops_per_chip") is not None:  # XLA's own count sees one layer of a scan
        flops = f", {p['model_flops_per_chip']:.3g} flops per chip"
    beside = f" + {_gib(p['beside_bytes'])} resident beside" if p["beside_bytes"] else ""
    return (f"{name}: peak {_gib(p['peak_bytes'])}{beside} (arguments "
            f"{_gib(p['argument_bytes'])}, temporaries {_gib(p['temp_bytes'])}){flops}, "
            f"compiled in {p['compile_seconds']:.1f} s: {'fits' if p['fits'] else 'does NOT fit'}")


def format_plan(plan: dict) -> str:
    """Human-readable summary of `memory_plan`'s dict."""
    shape = plan["list_shape"]
    lines = [f"model {plan['model']}: {plan['params_total']:,} parameters, "
             f"{plan['params_trainable']:,} trainable ({plan['params_lora']:,} LoRA)",
             f"target {plan['target']} ({plan['devices']} x {plan['device_kind']}, "
             f"{plan['hbm_gib']} GiB each), mesh {plan['mesh']}; step of "
             f"{shape['lists_per_step']} lists x {shape['candidates']} candidates x "
             f"{shape['response_tokens']} tokens, prompt {shape['prompt_tokens']} tokens",
             "per device, exact from the shardings:"]
    for name, n in plan["per_device_bytes"].items():
        lines.append(f"  {name:18s}{_gib(n):>11}")
    for name, p in plan["programs"].items():
        lines.append(f"  {program_line(name, p)}")
        if p["largest_buffers"]:
            lines.append("    largest buffers:")
            lines.extend(format_buffers(p["largest_buffers"]))
    failed = [name for name, p in plan["programs"].items() if p["compiler_error"]]
    if failed:
        verdict = (f"does NOT fit in {plan['hbm_gib']} GiB: the compiler ran out of memory "
                   f"for {', '.join(failed)}")
    elif plan["fits"] is None:
        verdict = (f"at least {_gib(plan['peak_bytes_per_device'])} per device (weights, "
                   f"optimizer state, gradients); whether it fits needs a compile (drop "
                   f"--no-compile, or --tpu NAME)")
    else:
        verdict = (f"peak {_gib(plan['peak_bytes_per_device'])} per device "
                   f"({plan['peak_source']}): {'fits' if plan['fits'] else 'does NOT fit'} "
                   f"in {plan['hbm_gib']} GiB")
    lines.append(verdict)
    return "\n".join(lines)
