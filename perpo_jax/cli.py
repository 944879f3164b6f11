"""`perpo-jax`: the command-line interface.

    perpo-jax prepare-data --config configs/demo_shapes.yaml data.num_train=500
    perpo-jax sample  --config C [--checkpoint DIR] [--num-prompts 4] [--out samples.jsonl]
    perpo-jax eval    --config C [--checkpoint DIR] --out runs/demo/eval
    perpo-jax convert --from-hf HF_DIR --out CKPT_DIR [--overwrite]      (HF → orbax params)
    perpo-jax convert --to-hf --checkpoint CKPT_DIR --out HF_DIR [--overwrite]
    perpo-jax export  --checkpoint DIR --out HF_DIR [--overwrite]       (LoRA merged first)
    perpo-jax export  --adapter --checkpoint DIR --out DIR [--overwrite]   (a PEFT adapter)
    perpo-jax train   --config C [overrides...] [--coordinator H:P --num-processes N --process-id I]
    perpo-jax plan    --config C [overrides...] (--tpu v5e-8 | --devices N --hbm-gib G) [--json]
    perpo-jax demo    [--task grounding|ocr] ...

Every subcommand takes `--config FILE` (omitted: the schema defaults of perpo_jax.config) and
dotted overrides `section.key=value`, anywhere on the line (before, between or after options).
A config error exits with status 2 and one line naming the key; other user errors (missing
files, bad checkpoints or data, a full or read-only disk, a run dir in use) exit 1 with one
line; Ctrl-C outside training exits 130 with one line (in `train` it saves and stops, as
SIGTERM does). Heavy modules (jax, transformers, TFDS) are imported inside the subcommands,
so `--help` is fast -- `demo --help` too (its parser is `perpo_jax.demo.args`).

Paths are resolved once, at this edge (`perpo_jax.cli_paths`): `--checkpoint`, `--out`,
`--from-hf` and the config's path keys are made absolute against the working directory before
anything runs, so a relative path means the same to orbax and TFDS, and in the config saved
with a run. A gs:// URL (`train.out_dir`, `checkpoint.dir`, `--checkpoint`,
`export`/`convert --out`) is kept as written and checked in its bucket (`perpo_jax.storage`).

Every `--out` (export, convert, eval, sample, pope, demo) goes through ONE guard
(`cli_paths.check_out_dir`, docs/safety.md): an existing non-empty `--out` is refused unless
`--overwrite` (then it is replaced as a whole); an `--out` that is or contains the working dir
or $HOME, that is, contains or lies inside the checkpoint, the checkpoint dir, the run's files,
the data (data.data_dir, data.path, data.image_dir, data.tokenizer) or the base model
(model.hf_path, `--from-hf`), or that is or contains the run dir (train.out_dir), is refused
even then; and `--out` must be writable, checked before the work. `--checkpoint` is checked
first of all: a missing or non-checkpoint directory is a one-line error before any work starts.
A checkpoint is read with this machine's devices: the config's mesh.shape when it fits them,
else fsdp over all of them (mesh.shape given on the command line is used as given).
"""
from __future__ import annotations

import json
import os
import sys

from perpo_jax.cli_paths import (
    INSIDE_NEW_ONLY,
    Guarded,
    OutDirError,
    absolute,
    check_checkpoint,
    check_out_dir,
    protected_paths,
    resolve_args,
    resolve_paths,
)
from perpo_jax.cli_parser import build_parser, parse_args  # noqa: F401  (cli.parse_args)
from perpo_jax.config import Config, ConfigError, load_config
from perpo_jax.host_memory import keep_host_memory
from perpo_jax.write_checks import WRITE_ERRNOS, OutputWriteError

# Exceptions a user causes (their message names the thing), by defining module: only those of
# modules already imported can have been raised, so matching imports nothing heavy.
_USER_ERRORS = (("perpo_jax.hf.errors", "CheckpointError"),
                ("perpo_jax.data.refcoco_style", "DataFileError"),
                ("perpo_jax.data.batching", "PromptTooLongError"),
                ("perpo_jax.assemble", "ModelProcessorMismatch"),
                ("perpo_jax.train.run_lock", "RunDirInUse"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions printed as one line, without a traceback."""
    loaded = tuple(getattr(sys.modules[module], name) for module, name in _USER_ERRORS
                   if module in sys.modules)
    return (FileNotFoundError, OutDirError, OutputWriteError) + loaded


# ----------------------------------------------------------------------------- shared pieces


def _load(args) -> Config:
    return resolve_paths(load_config(args.config, args.overrides))


def _setup(cfg, *, progress: bool = True):
    """(mesh, data) for commands that need the dataset and processor."""
    from perpo_jax.assemble import build_mesh
    from perpo_jax.data.prepare import prepare_data

    return build_mesh(cfg), prepare_data(cfg, progress=progress)


def _given_on_command_line(args, key: str) -> bool:
    """True when an override sets `key` (or its whole section)."""
    section = key.split(".")[0]
    return any(o.split("=", 1)[0].strip() in (key, section) for o in args.overrides)


def _fit_mesh(cfg: Config, args) -> None:
    """Commands that read a model (eval, sample, pope, export, convert) run on this machine's
    devices: the config's mesh.shape (maybe the training mesh, saved with the checkpoint)
    when it fits them, else fsdp over all of them, said on stderr. A mesh.shape given on the
    command line is used as given (a one-line error when it does not fit)."""
    from perpo_jax.mesh import make_mesh

    if _given_on_command_line(args, "mesh.shape"):
        return
    try:
        make_mesh(cfg.mesh.shape)
    except ValueError as e:
        import jax

        print(f"perpo-jax {args.command}: {e}: reading with mesh.shape=[1, -1, 1] (fsdp over "
              f"this machine's {jax.device_count()} devices; set mesh.shape=... to choose)",
              file=sys.stderr)
        cfg.mesh.shape = [1, -1, 1]


def _model(cfg, mesh, data, checkpoint: str | None):
    from perpo_jax.assemble import build_run_model
    from perpo_jax.restore import model_from_checkpoint

    if checkpoint is None:
        return build_run_model(cfg, mesh, data.processor)
    return model_from_checkpoint(cfg, checkpoint, mesh, data.processor)


# ----------------------------------------------------------------------------- commands


def cmd_prepare_data(args) -> int:
    cfg = _load(args)
    _, data = _setup(cfg)
    summary = {"source": cfg.data.source, "task": data.task, "data_dir": data.data_dir,
               "dataset": "built" if data.built else "reused",
               "dataset_reason": data.cache_reason,
               "train": len(data.train), "val": 0 if data.val is None else len(data.val),
               "processor_dir": data.processor_dir or cfg.model.hf_path,
               "tokenizer_size": len(data.processor.tokenizer), "skipped": len(data.skipped)}
    print(json.dumps(summary, indent=2))
    return 0


def _targets(task: str, example, k: int):
    """Ground truth repeated for k candidates: boxes [k, 4] (grounding) or k strings."""
    from perpo_jax.train.rounds import ground_truth, repeat_target

    return repeat_target(ground_truth(task, [example]), 0, k)


def _split(args, data, cfg: Config) -> str:
    """`--split`, or the default split of the data (said on stderr when it is not val)."""
    from perpo_jax.data.examples import default_split

    if args.split is not None:
        return args.split
    split = default_split(data)
    if split != "val":
        print(f"perpo-jax {args.command}: data.source={cfg.data.source!r} has no val split; "
              f"using --split {split}", file=sys.stderr)
    return split


def cmd_sample(args) -> int:
    import jax
    import numpy as np

    from perpo_jax.atomic import atomic_file
    from perpo_jax.data.examples import (prompt_batch_for, prompt_length, prompt_limit,
                                         record_example, split_source)
    from perpo_jax.rewards import get_reward
    from perpo_jax.sampling import sample

    cfg = _load(args)
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    if args.out:
        check_out_dir(args.out, protected_paths(cfg, checkpoint=args.checkpoint),
                      args.overwrite, kind="file")
    _fit_mesh(cfg, args)
    mesh, data = _setup(cfg)
    source = split_source(data, _split(args, data, cfg), cfg.data.source)
    examples = [record_example(source[i]) for i in range(min(args.num_prompts, len(source)))]
    length = prompt_length(examples, data.processor,
                           prompt_limit(cfg, "sampling.max_new_tokens"))
    model = _model(cfg, mesh, data, args.checkpoint)
    tok, s = data.processor.tokenizer, cfg.sampling
    batch = prompt_batch_for(examples, data.processor, length)
    out = sample(model, batch, num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
                 temperature=s.temperature, top_p=s.top_p, rng=jax.random.key(cfg.train.seed),
                 eos_id=data.processor.stop_ids, pad_id=tok.pad_token_id or 0, mesh=mesh)
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
        with atomic_file(args.out) as tmp:
            with open(tmp, "w") as f:
                f.write(text)
        print(f"wrote {len(lines)} prompts x {s.num_samples} samples to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_eval(args) -> int:
    from perpo_jax.atomic import atomic_dir
    from perpo_jax.data.examples import split_source
    from perpo_jax.eval import evaluate, write_eval_outputs

    cfg = _load(args)
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    check_out_dir(args.out, protected_paths(cfg, checkpoint=args.checkpoint), args.overwrite)
    _fit_mesh(cfg, args)
    mesh, data = _setup(cfg)
    split = _split(args, data, cfg)
    split_source(data, split, cfg.data.source)  # a missing split fails before the model is built
    model = _model(cfg, mesh, data, args.checkpoint)
    result = evaluate(model, data, cfg, split=split, mesh=mesh)
    with atomic_dir(args.out) as tmp:  # the whole dir or nothing; an old one is replaced
        written = write_eval_outputs(result, tmp)
    paths = {k: os.path.join(args.out, os.path.relpath(v, tmp)) for k, v in written.items()}
    print(json.dumps({"metrics": result.metrics, **paths}, indent=2, default=str))
    return 0


def cmd_pope(args) -> int:
    from perpo_jax.eval import run_pope
    from perpo_jax.eval.report import write_report

    cfg = _load(args)
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    if args.out:  # a new report beside the question files or images is fine, over one is not
        inputs = [Guarded("POPE question dir (--pope-dir)", args.pope_dir, INSIDE_NEW_ONLY),
                  Guarded("image dir (--image-dir)", args.image_dir, INSIDE_NEW_ONLY)]
        check_out_dir(args.out, protected_paths(cfg, checkpoint=args.checkpoint) + inputs,
                      args.overwrite, kind="file")
    _fit_mesh(cfg, args)
    report = run_pope(cfg, args.checkpoint, args.pope_dir, args.image_dir, limit=args.limit,
                      parser=args.parser)
    if args.out:
        write_report(args.out, report)
    print(json.dumps({"splits": report["splits"], "mean_f1": report["mean_f1"]}, indent=2))
    return 0


def _run_config(args, checkpoint: str) -> Config:
    """`--config`/overrides when given, else the config saved with the checkpoint."""
    from perpo_jax.export import run_config

    return _load(args) if args.config is not None else resolve_paths(
        run_config(checkpoint, args.overrides))


def cmd_convert(args) -> int:
    from perpo_jax import export

    if args.to_hf:
        if args.checkpoint is None:
            raise ConfigError("--checkpoint: required")
        check_checkpoint(args.checkpoint)
        cfg = _run_config(args, args.checkpoint)
        check_out_dir(args.out, protected_paths(cfg, checkpoint=args.checkpoint), args.overwrite)
        _fit_mesh(cfg, args)
        out = export.export_merged(cfg, args.checkpoint, args.out, merge_lora=False)
        print(f"wrote transformers checkpoint {out}")
        return 0
    cfg = _load(args)
    check_out_dir(args.out, protected_paths(cfg, **{"source model (--from-hf)": args.from_hf}),
                  args.overwrite)
    _fit_mesh(cfg, args)
    print(f"wrote orbax params checkpoint {export.convert_from_hf(cfg, args.from_hf, args.out)}")
    return 0


def cmd_export(args) -> int:
    from perpo_jax import export

    check_checkpoint(args.checkpoint)
    cfg = _run_config(args, args.checkpoint)
    check_out_dir(args.out, protected_paths(cfg, checkpoint=args.checkpoint), args.overwrite)
    _fit_mesh(cfg, args)
    if args.adapter:
        print(f"wrote PEFT adapter {export.export_adapter(cfg, args.checkpoint, args.out)}")
    else:
        print(f"wrote transformers checkpoint {export.export_merged(cfg, args.checkpoint, args.out)}")
    return 0


def cmd_train(args) -> int:
    cfg = _load(args)
    from perpo_jax.distributed import check_args, initialize_distributed

    try:
        check_args(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        print(f"perpo-jax train: error: {e}", file=sys.stderr)
        return 2
    # Before any other jax call. Explicit (--coordinator ...), automatic on a TPU VM or with
    # PERPO_JAX_DISTRIBUTED=1 (launch/tpu_run.sh: every host runs this same command), else never.
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from perpo_jax.train.loop import train

    result = train(cfg)
    if result.preempted:
        print(f"trained {result.steps} steps -> {result.out_dir} (stopped early, checkpoint "
              f"saved; rerun the same command to resume from step {result.steps})")
        return 0
    applied = result.steps - result.skipped
    why = "; ".join(f"{n} {reason}" for reason, n in result.skip_reasons.items()) or \
        f"{result.skipped} were skipped"
    if applied == 0 and result.steps:
        print(f"perpo-jax train: error: 0 of {result.steps} updates applied: {why}; nothing "
              f"was learned in {result.out_dir}", file=sys.stderr)
        return 1
    print(f"trained {result.steps} steps -> {result.out_dir}"
          + (f" ({applied} of {result.steps} updates applied; {why})" if result.skipped else ""))
    return 0


def cmd_plan(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.model.hf_path is not None:
        cfg.model.hf_path = absolute(cfg.model.hf_path)
    if args.tpu is None and args.devices is None:
        raise ConfigError("give --tpu NAME (a TPU slice, e.g. v5e-8) or --devices N --hbm-gib G")
    if args.tpu is not None and (args.devices is not None or args.hbm_gib is not None):
        raise ConfigError("--tpu NAME fixes the devices and their HBM: drop --devices/--hbm-gib")
    if args.tpu is None and (args.devices < 1 or args.hbm_gib is None or args.hbm_gib <= 0):
        raise ConfigError("--devices must be >= 1 and --hbm-gib > 0")
    if "jax" not in sys.modules:
        if args.tpu is not None:
            # the TPU compiler runs on this host: jax must not try to open a TPU (there may be
            # none, or a training run may hold it)
            os.environ["JAX_PLATFORMS"] = "cpu"
        elif args.compile:
            # compiling for N devices needs N devices in this process: on CPU, fake them
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                                           f"{args.devices}").strip()
    from perpo_jax.memory_plan import format_plan, memory_plan, program_line
    from perpo_jax.tpu_topology import TopologyError

    def progress(name, entry):  # stderr, as each program is done: a 7B round takes minutes
        print(f"perpo-jax plan: {program_line(name, entry)}", file=sys.stderr, flush=True)

    try:
        plan = memory_plan(cfg, devices=args.devices, hbm_gib=args.hbm_gib, tpu=args.tpu,
                           compile_programs=args.compile, prompt_length=args.prompt_tokens,
                           progress=progress)
    except TopologyError as e:
        print(f"perpo-jax plan: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def cmd_demo(args) -> int:
    from perpo_jax.demo import args as demo_args

    demo_args.parse_args(args.demo_args)  # --help and usage errors before the heavy import
    # a lazy import, the one kind allowed: perpo_jax.demo pulls in jax / flax / TFDS (~10 s)
    from perpo_jax.demo import run as demo

    result = demo.main(list(args.demo_args))
    return result if isinstance(result, int) else 0


COMMANDS = {
    "prepare-data": cmd_prepare_data,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "pope": cmd_pope,
    "convert": cmd_convert,
    "export": cmd_export,
    "train": cmd_train,
    "plan": cmd_plan,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (also raised as SystemExit by argparse)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        resolve_args(args)
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"perpo-jax {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"perpo-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full, read-only or forbidden disk, whoever was writing
        if e.errno not in WRITE_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"perpo-jax {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"perpo-jax {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def entry() -> int:
    """The `perpo-jax` console script: `main` in a process whose freed host memory is reused
    (`perpo_jax.host_memory`; not in `main`, which tests call inside their own process)."""
    keep_host_memory()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
