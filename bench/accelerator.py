"""Benchmark: the real train step and sampler on every local device, tokens/s and MFU.

Default shape: a ~1.3B LLaVA in bfloat16 with random weights — a Llama decoder of hidden
2048, 16 layers, 16 heads (MHA, as LLaVA-1.5's Vicuna), MLP 5632 (TinyLlama's ratio), vocab
32000, and a CLIP ViT-L/14-336 tower (1024 wide, 24 layers, feature layer -2: 23 run) — at
the paper's list shape: 2 lists x K = 20 candidates x R = 64 tokens per step, a 640-token
prompt (576 image + 64 text tokens). The step is `perpo_jax.train.step.build_train_step` as
the official recipe runs it (LoRA r=128 alpha=256 on every decoder linear, the projector
trained, bf16 frozen weights, float32 trainable weights and AdamW state, reference
log-probs precomputed, PerPO beta 0.1 gamma 0.5; `--full-finetune` trains every weight);
the sampler is `perpo_jax.sampling.sample` with K samples per prompt of exactly R new tokens
(no EOS), temperature 1. Both run on a mesh over all local devices (fsdp by default).

After a warm-up call (compiles), `--repeats` timed calls of each, interleaved
(`bench/timing.py`); each call blocks until its outputs are ready. Reported per program:
seconds (median, min), tokens/s (train: prompt + candidate tokens of every list per second,
the K·R candidate tokens also apart; sampler: generated tokens per second), model FLOPs from
`perpo_jax.flop_model` (MFU convention: no remat recompute, causal attention), achieved
TFLOP/s and MFU = achieved / (devices x the chip's peak dense bf16 FLOP/s from `PEAK_BF16`).
A device kind without a table entry (CPU) gives MFU null and a reason. XLA's own
`cost_analysis()` flops of the compiled step are reported beside: it counts each layer
scan's body once, so it is NOT the step's work. Prints ONE JSON object; progress on stderr.

    python bench/accelerator.py                 # the ~1B shape, on a GPU / TPU VM
    python bench/accelerator.py --tiny          # toy width, seconds on CPU (used by tests)
    python bench/accelerator.py --lists 8 --response-len 32 --full-finetune
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's perpo_jax
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, however run
from timing import log, machine_info, time_interleaved  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from perpo_jax import flop_model  # noqa: E402
from perpo_jax.config import LoraConfig, LossConfig, OptimConfig  # noqa: E402
from perpo_jax.mesh import MESH_AXES, batch_sharding, make_mesh  # noqa: E402
from perpo_jax.models import LlavaConfig, TextConfig, VisionConfig, build_model  # noqa: E402
from perpo_jax.models.config import as_jnp_dtype  # noqa: E402
from perpo_jax.models.lora import LoRAParam, apply_lora, merge_lora  # noqa: E402
from perpo_jax.sampling import sample  # noqa: E402
from perpo_jax.train.optim import make_optimizer  # noqa: E402
from perpo_jax.train.state import (create_train_state, partition_model,  # noqa: E402
                                   with_storage_dtypes)
from perpo_jax.train.step import build_ref_logps, build_train_step  # noqa: E402

# Peak dense bf16 FLOP/s per chip (no 2:4 sparsity), matched on `jax.Device.device_kind`.
# A JAX device is one chip on every kind here (TPU v4 / v5p run megacore: both TensorCores
# of a chip are one device). Order matters: the first pattern that matches wins.
PEAK_BF16 = (
    # NVIDIA H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): BF16 Tensor Core
    # 1,979 TFLOPS "with sparsity" -> 989 dense (Hopper whitepaper: 989.4). device_kind
    # "NVIDIA H100 80GB HBM3". The PCIe card is slower (1,513 sparse -> 756 dense).
    (r"^NVIDIA H100 PCIe", "H100 PCIe", 756.0,
     "nvidia.com/en-us/data-center/h100: H100 PCIe BF16 1,513 TFLOPS with sparsity / 2"),
    (r"^NVIDIA H100(?!.*\bNVL\b)", "H100 SXM", 989.0,
     "nvidia.com/en-us/data-center/h100: H100 SXM BF16 1,979 TFLOPS with sparsity / 2"),
    # NVIDIA H200 (nvidia.com/en-us/data-center/h200): the H100's GH100 compute with HBM3e;
    # H200 SXM BF16 1,979 TFLOPS with sparsity -> 989 dense. device_kind "NVIDIA H200".
    (r"^NVIDIA H200(?!.*\bNVL\b)", "H200 SXM", 989.0,
     "nvidia.com/en-us/data-center/h200: H200 SXM BF16 1,979 TFLOPS with sparsity / 2"),
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 Tensor
    # Core 312 TFLOPS dense (624 with sparsity), SXM4 and PCIe, 40 and 80 GB alike.
    (r"^NVIDIA A100", "A100", 312.0,
     "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    # Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/<version>),
    # "Peak compute per chip (bf16)". device_kind strings as jax reports them.
    (r"^TPU v4$", "TPU v4", 275.0, "cloud.google.com/tpu/docs/v4: 275 teraflops (bf16 or int8)"),
    (r"^TPU v5( lite|e)$", "TPU v5e", 197.0, "cloud.google.com/tpu/docs/v5e: 197 TFLOPs (bf16)"),
    (r"^TPU v5p?$", "TPU v5p", 459.0, "cloud.google.com/tpu/docs/v5p: 459 TFLOPs (bf16)"),
    (r"^TPU v6( lite|e)$", "TPU v6e", 918.0, "cloud.google.com/tpu/docs/v6e: 918 TFLOPs (bf16)"),
)


def peak_bf16(device_kind: str) -> dict | None:
    """{"chip", "peak_bf16_dense_tflops", "source"} of a device kind, or None (not in
    `PEAK_BF16`: CPU, an H100 NVL, a GPU or TPU the table does not list)."""
    for pattern, chip, tflops, source in PEAK_BF16:
        if re.search(pattern, device_kind.strip()):
            return {"chip": chip, "peak_bf16_dense_tflops": tflops, "source": source}
    return None


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="toy width and shape, the step compiled without LLVM optimisation "
                        "(seconds on CPU; used by tests)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16, help="< heads: grouped-query attention")
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vision-hidden", type=int, default=1024)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--vision-heads", type=int, default=16)
    p.add_argument("--vision-mlp", type=int, default=4096)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--prompt-text", type=int, default=64,
                   help="text tokens of the prompt, BOS included")
    p.add_argument("--lists", type=int, default=2,
                   help="lists per step (rounded up to a multiple of the data x fsdp devices)")
    p.add_argument("--candidates", type=int, default=20, help="K candidates per list = samples")
    p.add_argument("--response-len", type=int, default=64, help="R tokens per candidate / sample")
    p.add_argument("--full-finetune", action="store_true", help="train every weight (no LoRA)")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--naive", action="store_true", help="train step without prefix sharing")
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder layer")
    p.add_argument("--ref-in-step", action="store_true",
                   help="reference log-probs inside the step (train.precompute_ref off)")
    p.add_argument("--mesh", type=int, nargs=3, default=(1, -1, 1), metavar=MESH_AXES,
                   help="mesh shape over the local devices (one entry may be -1)")
    p.add_argument("--programs", nargs="+", default=["train", "sample"],
                   choices=["train", "sample"])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per program")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:  # every dimension small; the structure (CLIP "default", layer -2) kept
        args.hidden, args.layers, args.heads, args.kv_heads, args.mlp = 64, 2, 4, 2, 172
        args.vocab, args.vision_hidden, args.vision_layers = 256, 32, 2
        args.vision_heads, args.vision_mlp, args.image_size = 2, 128, 28
        args.prompt_text, args.candidates, args.response_len = 6, 4, 5
        args.lora_rank, args.repeats = 8, 2
    return args


# ----------------------------------------------------------------------------- model + data


def model_config(args) -> LlavaConfig:
    """bf16 compute; float32 at build (the trainer casts frozen weights to bf16 after)."""
    common = dict(dtype="bfloat16", param_dtype="float32")
    text = TextConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      head_dim=args.hidden // args.heads, family="llama", rms_norm_eps=1e-5,
                      max_position_embeddings=4096, remat=args.remat, **common)
    vision = VisionConfig(hidden_size=args.vision_hidden, intermediate_size=args.vision_mlp,
                          num_layers=args.vision_layers, num_heads=args.vision_heads,
                          image_size=args.image_size, patch_size=args.patch_size, family="clip",
                          hidden_act="quick_gelu", **common)
    return LlavaConfig(text=text, vision=vision, image_token_id=args.vocab - 1,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", **common)


def lora_config(args) -> LoraConfig | None:
    """The official recipe's LoRA (dropout off: train.disable_dropout), or None (full)."""
    if args.full_finetune:
        return None
    return LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, dropout=0.0,
                      trainable=["multi_modal_projector"])


def make_batch(cfg: LlavaConfig, args, lists: int) -> dict:
    """[B] lists in the scoring layout (docs/internals.md), numpy: prompt = BOS, the image
    tokens, text; K full-length candidates with distinct rewards (every pair ordered)."""
    rng = np.random.default_rng(args.seed)
    k, r, size = args.candidates, args.response_len, cfg.vision.image_size

    def text_ids(*shape):  # never the image token (the last id)
        return rng.integers(2, args.vocab - 1, size=shape).astype(np.int32)

    prompt = np.concatenate([np.ones((lists, 1), np.int32),
                             np.full((lists, cfg.num_image_tokens), cfg.image_token_id, np.int32),
                             text_ids(lists, args.prompt_text - 1)], axis=1)
    rewards = np.stack([rng.permutation(np.linspace(0.0, 1.0, k)) for _ in range(lists)])
    return {"pixel_values": rng.normal(size=(lists, 3, size, size)).astype(np.float32),
            "prompt_ids": prompt, "prompt_mask": np.ones(prompt.shape, bool),
            "response_ids": text_ids(lists, k, r), "response_mask": np.ones((lists, k, r), bool),
            "rewards": rewards.astype(np.float32), "list_mask": np.ones((lists, k), bool)}


def place_batch(batch: dict, mesh) -> dict:
    """Every array onto the mesh once, lists over (data, fsdp): no transfer in the timing."""
    return {name: jax.device_put(x, batch_sharding(mesh, x.ndim)) for name, x in batch.items()}


def count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def build_training(cfg: LlavaConfig, args, mesh) -> dict:
    """The model split for training as `train/loop.py` does it, on `mesh`: LoRA attached
    (float32 adapters), frozen weights stored in bf16, trainable ones in float32."""
    # random weights drawn with the "rbg" PRNG: its kernels compile in ~60 % of threefry's
    # time (measured: 6.3 vs 10.2 s to build the --tiny model on CPU), the values don't matter
    model = build_model(cfg, rngs=nnx.Rngs(jax.random.key(args.seed, impl="rbg")))
    base_params = count(nnx.state(model, nnx.Param))
    lora = lora_config(args)
    if lora is not None:
        apply_lora(model, lora, nnx.Rngs(args.seed), param_dtype=as_jnp_dtype("float32"))
    lora_params = count(nnx.state(model, LoRAParam))
    parts = with_storage_dtypes(partition_model(model, lora), frozen_dtype=as_jnp_dtype("bfloat16"),
                                trainable_dtype=as_jnp_dtype("float32"))
    del model  # its float32 copy of the base would stay alive on the device
    optimizer, schedule = make_optimizer(OptimConfig(), total_steps=1000)
    state, frozen, reference = create_train_state(parts, optimizer, mesh, seed=args.seed)
    return {"parts": parts, "optimizer": optimizer, "schedule": schedule, "state": state,
            "frozen": frozen, "reference": reference, "base_params": base_params,
            "lora_params": lora_params,
            "trainable_params": count(parts.params)}


# ----------------------------------------------------------------------------- programs


# --tiny: LLVM optimisation off for the step (XLA's HLO passes, so its program and FLOP
# count, unchanged): it compiles in about half the time; toy-width timings mean nothing anyway
TINY_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def train_runner(run: dict, batch: dict, args, mesh):
    """(a no-argument callable: one step to completion, keeping the new state; compile s;
    XLA's cost_analysis flops per device of the compiled step)."""
    parts = run["parts"]
    step = build_train_step(parts.graphdef, run["state"], run["frozen"], run["reference"],
                            loss_cfg=LossConfig(), optimizer=run["optimizer"],
                            schedule=run["schedule"], mesh=mesh, shared_prefix=not args.naive)
    log("compiling the train step")
    start = time.perf_counter()
    options = TINY_COMPILE if args.tiny else None
    compiled = step.lower(run["state"], run["frozen"], run["reference"], batch).compile(options)
    compile_s = time.perf_counter() - start

    def once():
        state, metrics = compiled(run["state"], run["frozen"], run["reference"], batch)
        jax.block_until_ready((state, metrics))
        run["state"], run["metrics"] = state, metrics

    return once, compile_s, xla_cost_flops(compiled)


def xla_cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    except Exception:  # a backend without it
        return None


def sampling_model(run: dict):
    """(graphdef, state) of the policy with its LoRA folded into the kernels
    (`models.lora.merge_lora`, as export does), copied off the train state, which the step
    donates. Folded because `sample` on a model with LoRA adapters attached fails in its
    decode loop on this revision (flax TraceContextError: the adapters' dropout RNG count is
    written back from inside the while_loop; tests/test_loop.py's online LoRA test fails the
    same way)."""
    parts = run["parts"]
    model = merge_lora(nnx.merge(parts.graphdef, run["state"].params, run["frozen"], copy=True))
    graphdef, state = nnx.split(model)
    return graphdef, jax.tree.map(jnp.copy, state)


def sample_runner(run: dict, cfg: LlavaConfig, batch: dict, args, mesh):
    """A no-argument callable: K samples of exactly R tokens per prompt (no EOS)."""
    prompts = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "pixel_values")}
    model = sampling_model(run)
    calls = iter(range(10 ** 9))

    def once():
        call = next(calls)
        out = sample(model, prompts, num_samples=args.candidates, max_new_tokens=args.response_len,
                     temperature=1.0, top_p=1.0, rng=jax.random.key(call), eos_id=None,
                     mesh=mesh, suppress_ids=(cfg.image_token_id,))
        jax.block_until_ready(out)
        if call == 0 and int(out.lengths.min()) != args.response_len:  # checked untimed
            raise RuntimeError("a sample stopped before --response-len tokens without an EOS")

    return once


# ----------------------------------------------------------------------------- report


def utilisation(flops: float, seconds: float, devices: int, peak: dict | None) -> dict:
    achieved = flops / seconds
    mfu = None if peak is None else achieved / (devices * peak["peak_bf16_dense_tflops"] * 1e12)
    # significant digits, not decimals: a tiny CPU run achieves ~1e-4 TFLOP/s
    return {"achieved_tflop_per_s": float(f"{achieved / 1e12:.6g}"),
            "mfu": None if mfu is None else float(f"{mfu:.4g}")}


def seconds_of(times: dict) -> dict:
    return {"median": times["median_s"], "min": times["min_s"], "first_call": times["first_s"]}


def train_report(args, dims, lists, times, compile_s, xla_flops, devices, peak, metrics) -> dict:
    p, k, r = dims["prompt"], dims["candidates"], dims["response"]
    kwargs = dict(lists=lists, shared=not args.naive,
                  train="full" if args.full_finetune else "lora",
                  lora_rank=0 if args.full_finetune else args.lora_rank,
                  train_projector=True, reference_in_step=args.ref_in_step, remat=args.remat)
    model = flop_model.train_step_flops(dims, **kwargs)
    executed = flop_model.train_step_flops(dims, executed=True, **kwargs)
    median = times["median_s"]
    return {"seconds": seconds_of(times), "compile_s": round(compile_s, 3),
            "tokens_per_step": lists * (p + k * r), "candidate_tokens_per_step": lists * k * r,
            "tokens_per_s": round(lists * (p + k * r) / median, 2),
            "candidate_tokens_per_s": round(lists * k * r / median, 2),
            "model_flops_per_step": model["total"],
            "model_flops_breakdown": {n: v for n, v in model.items() if n != "total"},
            "executed_flops_per_step": executed["total"],
            "xla_cost_analysis_flops_per_device": xla_flops,
            **utilisation(model["total"], median, devices, peak),
            "last_loss": float(metrics["loss"]), "skipped_updates": int(metrics["skipped"])}


def sample_report(args, dims, lists, times, devices, peak) -> dict:
    # the sampled model has its adapters folded in (`sampling_model`): no LoRA work
    flops = flop_model.sampler_flops(dims, prompts=lists, samples=args.candidates,
                                     new_tokens=args.response_len)
    median = times["median_s"]
    return {"seconds": seconds_of(times), "compile_s_estimate": round(times["first_s"] - median, 3),
            "generated_tokens": flops["generated_tokens"],
            "tokens_per_s": round(flops["generated_tokens"] / median, 2),
            "model_flops": flops["total"],
            "model_flops_breakdown": {"prefill": flops["prefill"], "decode": flops["decode"],
                                      "decode_per_token": flops["decode_per_token"]},
            **utilisation(flops["total"], median, devices, peak)}


def config_report(cfg: LlavaConfig, args, run: dict, lists: int, mesh) -> dict:
    t, v = cfg.text, cfg.vision
    return {
        "decoder": {"layers": t.num_layers, "hidden": t.hidden_size, "mlp": t.intermediate_size,
                    "heads": t.num_heads, "kv_heads": t.num_kv_heads, "head_dim": t.head_dim,
                    "vocab": t.vocab_size},
        "vision": {"family": v.family, "image_size": v.image_size, "patch_size": v.patch_size,
                   "layers": v.num_layers, "hidden": v.hidden_size, "mlp": v.intermediate_size,
                   "heads": v.num_heads, "feature_layer": cfg.vision_feature_layer},
        "params_base": run["base_params"], "params_lora": run["lora_params"],
        "params_trainable": run["trainable_params"],
        "dtypes": {"compute": "bfloat16", "frozen": "bfloat16", "trainable": "float32"},
        "training": {"mode": "full" if args.full_finetune else "lora",
                     "lora_rank": None if args.full_finetune else args.lora_rank,
                     "lora_alpha": None if args.full_finetune else 2.0 * args.lora_rank,
                     "projector_trained": True, "shared_prefix": not args.naive,
                     "reference_in_step": args.ref_in_step, "remat": args.remat,
                     "loss": "perpo beta 0.1 gamma 0.5", "optimizer": "AdamW (optim defaults)"},
        "shape": {"lists_requested": args.lists, "lists": lists,
                  "candidates_K": args.candidates, "response_tokens_R": args.response_len,
                  "image_tokens": cfg.num_image_tokens, "prompt_tokens": cfg.num_image_tokens
                  + args.prompt_text, "samples_per_prompt": args.candidates,
                  "new_tokens_per_sample": args.response_len},
        "mesh": dict(zip(MESH_AXES, (int(s) for s in mesh.devices.shape))),
        "repeats": args.repeats, "tiny": args.tiny,
    }


CONVENTIONS = {
    "train_tokens_per_s": "lists x (prompt + K x R) tokens per second of the step",
    "sample_tokens_per_s": "generated tokens (prompts x K x R) per second",
    "model_flops": "perpo_jax.flop_model, 2 per multiply-add of the matmuls; causal attention; "
                   "no remat recompute; LoRA step: frozen weights get dX only",
    "mfu": "achieved model FLOP/s / (devices x peak dense bf16 FLOP/s per chip)",
    "xla_cost_analysis_flops_per_device": "XLA's count: each layer scan's body ONCE, not the work",
}


def main(argv=None):
    args = parse_args(argv)
    if jax.process_count() > 1:
        raise SystemExit("bench/accelerator.py runs on one host (its local devices); "
                         f"this is process {jax.process_index()} of {jax.process_count()}")
    devices = jax.devices()
    mesh = make_mesh(args.mesh, devices=devices)
    unit = int(mesh.shape["data"] * mesh.shape["fsdp"])
    lists = -(-args.lists // unit) * unit  # every list real: padding lists would cost work too
    cfg = model_config(args)
    log(f"building the model on {len(devices)} x {devices[0].device_kind}")
    run = build_training(cfg, args, mesh)
    batch = place_batch(make_batch(cfg, args, lists), mesh)
    if not args.ref_in_step:  # precompute_ref: stored with the lists, outside the step
        ref_fn = build_ref_logps(run["parts"].graphdef, run["state"].params, run["frozen"],
                                 run["reference"], mesh=mesh, shared_prefix=not args.naive)
        batch["ref_logps"] = ref_fn(run["state"].params, run["frozen"], run["reference"], batch)
    runners, compile_s, xla_flops = {}, None, None
    if "train" in args.programs:
        runners["train"], compile_s, xla_flops = train_runner(run, batch, args, mesh)
    if "sample" in args.programs:
        runners["sample"] = sample_runner(run, cfg, batch, args, mesh)
    times = time_interleaved(runners, args.repeats)
    kind = devices[0].device_kind
    peak = peak_bf16(kind)
    dims = flop_model.model_dims(cfg, prompt=cfg.num_image_tokens + args.prompt_text,
                                 response=args.response_len, candidates=args.candidates)
    result = {
        "machine": machine_info(),
        "device": {"kind": kind, "platform": devices[0].platform, "count": len(devices),
                   "peak": peak},
        "mfu_unavailable_reason": None if peak is not None else (
            f"no peak bf16 figure for device kind {kind!r} in bench/accelerator.py's PEAK_BF16"),
        "config": config_report(cfg, args, run, lists, mesh),
        "conventions": CONVENTIONS,
    }
    if "train" in times:
        result["train_step"] = train_report(args, dims, lists, times["train"], compile_s,
                                            xla_flops, len(devices), peak, run["metrics"])
    if "sample" in times:
        result["sampler"] = sample_report(args, dims, lists, times["sample"], len(devices), peak)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
