"""`perpo-jax`'s command line: one subparser per command, shared adders for the options
several commands take (--config and overrides, --checkpoint, --split, --out with --overwrite).
Imports nothing but argparse, so `perpo-jax --help` answers at once; `perpo_jax.cli` runs the
command that `parse_args` names in `args.command`.
"""
from __future__ import annotations

import argparse


_SPLIT_HELP = ("which split's prompts: val | train (default: val, or train where the data has "
               "no val split: data.source=official_json lists are train-only)")
_CHECKPOINT_HELP = ("training checkpoint (the run's checkpoints/ dir or one step dir in it) or a "
                    "converted params checkpoint; default: the model the config builds")
_OVERWRITE_HELP = ("replace a non-empty --out as a whole (an --out that is or contains the "
                   "working dir, $HOME or the run dir, or that is, contains or lies inside the "
                   "checkpoint, data or base model, is refused even so; docs/safety.md)")
_OVERWRITE_FILE_HELP = ("replace an existing --out file (never the data, a checkpoint's or a "
                        "run's own files; docs/safety.md)")

_TRAIN_DESCRIPTION = """\
Trains a policy with the loss of loss.name (perpo | dpo | lipo | lipo_lambda | sft).

modes (train.mode):
  online   rounds (train.rounds; 0 = one pass over the data): each takes
           sampling.prompts_per_round prompts, samples sampling.num_samples candidates per
           prompt from the current policy, rewards them (data.task) and trains on the lists
           whose best-worst reward gap is at least data.min_margin
  offline  trains on pre-sampled candidate lists (data.source=official_json: answers_gen +
           iou_scores), train.epochs passes over them

outputs, under train.out_dir (default runs/default):
  checkpoints/   orbax checkpoints (checkpoint.dir overrides; checkpoint.save_every, .keep)
  metrics.jsonl  one JSON row per step and per round
  tb/            TensorBoard events (one file per run)
  curves.png     loss / pair accuracy / mean reward against step
  lists/         each round's lists, so a resumed run continues exactly
Running the same command again resumes from the latest checkpoint (checkpoint.resume).
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML config (default: the schema defaults of perpo_jax.config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides, e.g. optim.lr=1e-5 mesh.shape=[2,2,2]")


def _add_checkpoint(p: argparse.ArgumentParser, *, required: bool = False,
                    help: str = _CHECKPOINT_HELP) -> None:
    p.add_argument("--checkpoint", metavar="DIR", required=required, help=help)


def _add_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=("val", "train"), default=None, help=_SPLIT_HELP)


def _add_out(p: argparse.ArgumentParser, *, metavar: str, help: str, required: bool = True,
             file: bool = False) -> None:
    """--out and its --overwrite (a dir is replaced as a whole, a file as one)."""
    p.add_argument("--out", metavar=metavar, required=required, default=None, help=help)
    p.add_argument("--overwrite", action="store_true",
                   help=_OVERWRITE_FILE_HELP if file else _OVERWRITE_HELP)


def _add_prepare_data(sub) -> None:
    p = sub.add_parser("prepare-data", help="build the dataset and tokenizer/processor",
                       description="Builds (or reuses) the dataset under data.data_dir and the "
                       "processor, and prints a JSON summary: counts, and whether the dataset "
                       "was built or reused, and why.")
    _common(p)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample candidates for val prompts and reward them (JSONL)",
                       description="Samples sampling.num_samples candidates for the first "
                       "prompts of a split and rewards them against the ground truth: one JSON "
                       "line per prompt (question, answer, candidates, rewards).")
    _common(p)
    _add_checkpoint(p)
    p.add_argument("--num-prompts", type=int, default=4, metavar="N",
                   help="how many prompts: the first N of the split (default: 4)")
    _add_split(p)
    _add_out(p, metavar="FILE", help="JSONL file to write (default: stdout)", required=False,
             file=True)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="greedy evaluation: report.json (+ boxes.png)",
                       description="Greedy-decodes the first eval.num_examples prompts of a "
                       "split and writes report.json (metrics and every prediction) and, for "
                       "grounding, boxes.png into --out.")
    _common(p)
    _add_checkpoint(p)
    _add_split(p)
    _add_out(p, metavar="DIR",
             help="directory for report.json and boxes.png (written whole; see --overwrite)")


def _add_pope(sub) -> None:
    p = sub.add_parser("pope", help="POPE object-hallucination eval (per split + mean F1)",
                       description="Greedy yes/no answers to the official POPE question files "
                       "(coco_pope_{random,popular,adversarial}.json) over COCO val2014 images; "
                       "prints per-split accuracy / precision / recall / F1 / yes ratio and "
                       "the mean F1 over the splits, as LLaVA-1.5 reports POPE.")
    _common(p)
    _add_checkpoint(p)
    p.add_argument("--pope-dir", required=True, metavar="DIR",
                   help="holds coco_pope_{random,popular,adversarial}.json")
    p.add_argument("--image-dir", required=True, metavar="DIR", help="COCO val2014 images")
    p.add_argument("--limit", type=int, default=0, help="first N questions per split (0: all)")
    p.add_argument("--parser", choices=("pope", "exact"), default="pope",
                   help="pope: the official rule (a 'no'/'not' word means no); exact: "
                   "lmms-eval's (the answer must be exactly yes or no)")
    _add_out(p, metavar="FILE", help="report JSON (metrics and every answer)", required=False,
             file=True)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF <-> orbax params checkpoints",
                       description="--from-hf: a transformers model dir -> an orbax params "
                       "checkpoint; --to-hf: a checkpoint without LoRA adapters -> a "
                       "transformers dir (use `export` for LoRA runs).")
    _common(p)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", action="store_true",
                     help="convert --checkpoint DIR into a transformers dir")
    way.add_argument("--from-hf", metavar="HF_DIR",
                     help="transformers model dir to convert into an orbax params checkpoint")
    _add_checkpoint(p, help="source checkpoint for --to-hf")
    _add_out(p, metavar="DIR", help="directory to write (replaced as a whole; see --overwrite)")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="training checkpoint → transformers dir, LoRA merged",
                       description="Merges the LoRA adapters of a training checkpoint into the "
                       "base weights and writes a transformers dir (safetensors, config.json, "
                       "processor files). Without --config the config saved with the "
                       "checkpoint is used.")
    _common(p)
    _add_checkpoint(p, required=True,
                    help="training checkpoint: the run's checkpoints/ dir or one step dir in it")
    _add_out(p, metavar="HF_DIR",
             help="transformers dir to write (replaced as a whole; see --overwrite)")
    p.add_argument("--adapter", action="store_true",
                   help="write the LoRA adapters unmerged as a PEFT adapter dir "
                   "(adapter_config.json + adapter_model.safetensors; docs/peft.md)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="the PerPO loop (online rounds or offline lists)",
                       description=_TRAIN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    group = p.add_argument_group(
        "multi-process (all three, or none: then jax.distributed starts by itself on a TPU VM "
        "or with PERPO_JAX_DISTRIBUTED=1, and never otherwise)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="parameter counts and per-device memory: does it fit?",
                       description="Counts parameters (total = transformers' count, trainable), "
                       "the exact per-device bytes of base weights, trainable weights, optimizer "
                       "state and gradients, and compiles the programs of a round (train step, "
                       "reference log-probs, sampler prefill and decode step) on abstract "
                       "arrays (no weights are read or allocated): XLA's peak per device, "
                       "flops, compile time and largest buffers. --tpu NAME compiles with "
                       "XLA's TPU compiler on this host (the libtpu package; no TPU needed); "
                       "--devices N --hbm-gib G for N CPU devices. Reads only config.json of "
                       "model.hf_path. docs/tpu_plan.md")
    _common(p)
    p.add_argument("--tpu", metavar="NAME", default=None,
                   help="a TPU slice: v5e-1/4/8/16/.../256, v6e-1/.../256, v4-8/16/.../4096, "
                   "v5p-8/16/.../8192 (chips and HBM per chip from its table)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="devices (chips) of the slice, compiled for N CPU devices of this process")
    p.add_argument("--hbm-gib", type=float, default=None, metavar="G",
                   help="memory per device in GiB with --devices, e.g. 16 (v5e), 32 (v4)")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="P",
                   help="prompt length with the image tokens (default: image tokens + 64)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="exact weight/optimizer bytes only, no compile (a 7B round takes "
                   "minutes and GBs of host memory to compile)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded demo: base → PerPO/DPO/LiPO/SFT/RFT → eval → "
                       "export (--train-base --out DIR: make the base)", add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER,
                   help="passed to perpo_jax.demo (try `perpo-jax demo --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perpo-jax", description=(
        "PerPO (discriminative rewarding + listwise preference optimisation) for LLaVA in JAX."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare_data, _add_sample, _add_eval, _add_pope, _add_convert,
                _add_export, _add_train, _add_plan, _add_demo):
        add(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; dotted overrides may come anywhere after the command (argparse
    alone takes only the first run of them: `eval --config C a=1 --out D b=2`)."""
    if argv[:1] == ["demo"]:
        # everything after `demo` belongs to the demo's own parser (argparse would reject --task)
        return argparse.Namespace(command="demo", demo_args=argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags = [a for a in extra if a.startswith("-")]
    if flags or not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    args.overrides = list(args.overrides) + extra  # parse_override names a malformed one
    return args
