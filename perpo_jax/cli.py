"""`perpo-jax`: the command-line interface.

    perpo-jax prepare-data --config configs/demo_shapes.yaml data.num_train=500
    perpo-jax sample  --config C [--checkpoint DIR] [--num-prompts 4] [--out samples.jsonl]
    perpo-jax eval    --config C [--checkpoint DIR] --out runs/demo/eval
    perpo-jax convert --from-hf HF_DIR --out CKPT_DIR        (HF → orbax params)
    perpo-jax convert --to-hf --checkpoint CKPT_DIR --out HF_DIR
    perpo-jax export  --checkpoint DIR --out HF_DIR           (LoRA merged first)
    perpo-jax train   --config C [overrides...]
    perpo-jax demo    [--task grounding|ocr] ...

Every subcommand takes `--config FILE` (omitted: the schema defaults of perpo_jax.config) and
dotted overrides `section.key=value`. A config error exits with status 2 and one line naming
the key; other user errors (missing files, bad checkpoints or data) exit 1 with their message.
Heavy modules (jax, transformers, TFDS) are imported inside the subcommands, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from perpo_jax.config import ConfigError, config_from_dict, load_config


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user causes (their message names the thing); no traceback for these."""
    from perpo_jax.models.from_config import ModelProcessorMismatch
    from perpo_jax.data.batching import PromptTooLongError
    from perpo_jax.data.refcoco_style import DataFileError
    from perpo_jax.hf import CheckpointError

    return (FileNotFoundError, CheckpointError, DataFileError, PromptTooLongError,
            ModelProcessorMismatch)


# ----------------------------------------------------------------------------- shared pieces


def _load(args) -> object:
    return load_config(args.config, args.overrides)


def _setup(cfg, *, progress: bool = True):
    """(mesh, data) for commands that need the dataset and processor."""
    from perpo_jax.models.from_config import build_mesh
    from perpo_jax.data.prepare import prepare_data

    return build_mesh(cfg), prepare_data(cfg, progress=progress)


def _model(cfg, mesh, data, checkpoint: str | None):
    from perpo_jax.models.from_config import build_model
    from perpo_jax.restore import model_from_checkpoint

    if checkpoint is None:
        return build_model(cfg, mesh, data.processor)
    return model_from_checkpoint(cfg, checkpoint, mesh, data.processor)


# ----------------------------------------------------------------------------- commands


def cmd_prepare_data(args) -> int:
    cfg = _load(args)
    _, data = _setup(cfg)
    summary = {"source": cfg.data.source, "task": data.task, "data_dir": data.data_dir,
               "train": len(data.train), "val": 0 if data.val is None else len(data.val),
               "processor_dir": data.processor_dir or cfg.model.hf_path,
               "tokenizer_size": len(data.processor.tokenizer), "skipped": len(data.skipped)}
    print(json.dumps(summary, indent=2))
    return 0


def _targets(task: str, example, k: int):
    """Ground truth repeated for k candidates: boxes [k, 4] (grounding) or k strings."""
    from perpo_jax.train.rounds import ground_truth, repeat_target

    return repeat_target(ground_truth(task, [example]), 0, k)


def cmd_sample(args) -> int:
    import jax
    import numpy as np

    from perpo_jax.data.prepare import prompt_batch_for, record_example
    from perpo_jax.evaluate import prompt_length
    from perpo_jax.rewards import get_reward
    from perpo_jax.sampling import sample

    cfg = _load(args)
    mesh, data = _setup(cfg)
    source = data.val if args.split == "val" else data.train
    if source is None:
        raise ConfigError(f"data.source: the dataset has no {args.split!r} split")
    examples = [record_example(source[i]) for i in range(min(args.num_prompts, len(source)))]
    model = _model(cfg, mesh, data, args.checkpoint)
    tok, s = data.processor.tokenizer, cfg.sampling
    batch = prompt_batch_for(examples, data.processor, prompt_length(examples, data.processor))
    out = sample(model, batch, num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
                 temperature=s.temperature, top_p=s.top_p, rng=jax.random.key(cfg.train.seed),
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0, mesh=mesh)
    tokens = np.asarray(jax.device_get(out.tokens))  # [B, K, R]
    reward_fn = get_reward(data.task)
    lines = []
    for example, rows in zip(examples, tokens):
        texts = [data.processor.decode_response(r) for r in rows]
        rewards = reward_fn(texts, _targets(data.task, example, len(texts)))
        lines.append(json.dumps({"question": example.question, "answer": example.answer,
                                 "candidates": texts,
                                 "rewards": [float(r) for r in np.asarray(rewards)]}))
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {len(lines)} prompts x {s.num_samples} samples to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_eval(args) -> int:
    from perpo_jax.evaluate import evaluate, write_eval_outputs

    cfg = _load(args)
    mesh, data = _setup(cfg)
    model = _model(cfg, mesh, data, args.checkpoint)
    result = evaluate(model, data, cfg, split=args.split, mesh=mesh)
    paths = write_eval_outputs(result, args.out)
    print(json.dumps({"metrics": result.metrics, **paths}, indent=2, default=str))
    return 0


def _run_config(args, checkpoint: str):
    """The config of a training checkpoint: `--config`/overrides when given, else the
    resolved config saved in the checkpoint's metadata, else the schema defaults."""
    if args.config is not None:
        return _load(args)
    from perpo_jax.checkpoint import Checkpointer

    try:
        with Checkpointer(checkpoint, save_every=1, async_save=False) as ckpt:
            meta = ckpt.read_metadata() if ckpt.latest_step() is not None else {}
    except (FileNotFoundError, ValueError):
        meta = {}
    tree = meta.get("config", meta) if isinstance(meta, dict) else {}
    try:
        return config_from_dict(tree, args.overrides)
    except ConfigError:  # metadata is not a config: fall back to the defaults
        return load_config(None, args.overrides)


def _to_hf(args, *, merge: bool) -> int:
    """Training or converted checkpoint → transformers dir (LoRA merged when `merge`)."""
    from flax import nnx

    from perpo_jax.models.from_config import build_mesh
    from perpo_jax.restore import is_params_checkpoint, model_from_checkpoint
    from perpo_jax.data.prepare import prepare_data
    from perpo_jax.hf import CheckpointError, save_pretrained
    from perpo_jax.models.lora import LoRAParam

    if args.checkpoint is None:
        raise ConfigError("--checkpoint: required")
    cfg = _run_config(args, args.checkpoint)
    mesh = build_mesh(cfg)
    if is_params_checkpoint(args.checkpoint):
        model, source_dir = model_from_checkpoint(cfg, args.checkpoint, mesh, None), args.checkpoint
    else:
        data = prepare_data(cfg)
        model = model_from_checkpoint(cfg, args.checkpoint, mesh, data.processor, merge_lora=merge)
        source_dir = cfg.model.hf_path or data.processor_dir
    if not merge and nnx.state(model, LoRAParam):
        raise CheckpointError(f"{args.checkpoint} has LoRA adapters: use `perpo-jax export`, "
                              "which merges them into the base weights")
    out = save_pretrained(model, args.out, source_dir=source_dir)
    print(f"wrote transformers checkpoint {out}")
    return 0


def _from_hf(args) -> int:
    from perpo_jax.models.from_config import build_mesh
    from perpo_jax.restore import save_params_checkpoint
    from perpo_jax.hf import load_pretrained
    from perpo_jax.models.config import as_jnp_dtype

    cfg = _load(args)
    model = load_pretrained(args.from_hf, dtype=as_jnp_dtype(cfg.model.dtype), mesh=build_mesh(cfg))
    out = save_params_checkpoint(model, args.out, source_dir=args.from_hf)
    print(f"wrote orbax params checkpoint {out}")
    return 0


def cmd_convert(args) -> int:
    return _to_hf(args, merge=False) if args.to_hf else _from_hf(args)


def cmd_export(args) -> int:
    return _to_hf(args, merge=True)


def cmd_train(args) -> int:
    cfg = _load(args)
    if os.environ.get("PERPO_JAX_DISTRIBUTED") == "1":
        # Multi-host (launch/tpu_run.sh): every host runs this same command; the slice is
        # discovered by JAX itself. Must happen before any other jax call.
        import jax

        jax.distributed.initialize()
    from perpo_jax.train.loop import train

    result = train(cfg)
    print(f"trained {result.steps} steps -> {result.out_dir}"
          + (" (stopped early, checkpoint saved)" if result.preempted else ""))
    return 0


def cmd_demo(args) -> int:
    from perpo_jax import demo

    result = demo.main(list(args.demo_args))
    return result if isinstance(result, int) else 0


# ----------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML config (default: the schema defaults of perpo_jax.config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides, e.g. optim.lr=1e-5 mesh.shape=[2,2,2]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perpo-jax", description=(
        "PerPO (discriminative rewarding + listwise preference optimisation) for LLaVA in JAX."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-data", help="build the dataset and tokenizer/processor")
    _common(p)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("sample", help="sample candidates for val prompts and reward them (JSONL)")
    _common(p)
    p.add_argument("--checkpoint", metavar="DIR", help="training or converted checkpoint")
    p.add_argument("--num-prompts", type=int, default=4, help="first N prompts of the split")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--out", metavar="FILE", help="JSONL output (default: stdout)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="greedy evaluation: report.json (+ boxes.png)")
    _common(p)
    p.add_argument("--checkpoint", metavar="DIR", help="training or converted checkpoint")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="HF <-> orbax params checkpoints")
    _common(p)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", action="store_true", help="--checkpoint DIR → transformers dir")
    way.add_argument("--from-hf", metavar="HF_DIR", help="transformers dir → orbax params")
    p.add_argument("--checkpoint", metavar="DIR", help="source checkpoint for --to-hf")
    p.add_argument("--out", metavar="DIR", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="training checkpoint → transformers dir, LoRA merged")
    _common(p)
    p.add_argument("--checkpoint", metavar="DIR", required=True)
    p.add_argument("--out", metavar="HF_DIR", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="the PerPO loop (online rounds or offline lists)")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the embedded demo: SFT → PerPO/DPO/LiPO → eval → export",
                       add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER,
                   help="passed to perpo_jax.demo (try `perpo-jax demo --help`)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (also raised as SystemExit by argparse)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        # everything after `demo` belongs to the demo's own parser (argparse would reject --task)
        args = argparse.Namespace(command="demo", func=cmd_demo, demo_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"perpo-jax {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"perpo-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
