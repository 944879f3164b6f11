"""`perpo-jax demo`'s command line, kept apart from `perpo_jax.demo.run` so that `demo --help` and
a usage error answer at once: this module imports nothing heavy (no jax, flax, TFDS), while
`perpo_jax.demo.run` takes seconds to import.

    args = parse_args(["--task", "ocr", "--out", "runs/ocr", "train.seed=1"])
"""
from __future__ import annotations

import argparse

from perpo_jax.config import DEMO_METHODS

DESCRIPTION = "base → sample → reward → PerPO / DPO / LiPO / SFT / RFT → eval → export"


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in DEMO_METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{bad or text!r}: methods are {', '.join(DEMO_METHODS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perpo-jax demo", description=DESCRIPTION)
    p.add_argument("--task", choices=("grounding", "ocr"), default="grounding")
    p.add_argument("--config", default=None, help="default: configs/demo_shapes.yaml (or "
                   "demo_ocr.yaml); with --train-base: configs/demo_base.yaml")
    p.add_argument("--out", default=None, help="output folder (default: train.out_dir); "
                   "refused when it holds anything but the demo's dataset, unless --overwrite; "
                   "with --train-base: the base dir to write (required)")
    p.add_argument("--train-base", action="store_true",
                   help="only run the SFT warm-up and save it as an HF base dir (--out) with "
                        "base_card.json; align from it with demo.base_path=DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="clear a non-empty --out first (its data.data_dir, when inside it, is "
                        "kept); --train-base: replace the base dir")
    p.add_argument("--method", default=None, type=_methods, metavar="M[,M...]",
                   help="comma-separated methods to train from the SFT model (default: "
                        "demo.methods); m3po = DPO on M3P-Score pairs, rm_dpo / vanilla_dpo its "
                        "pair baselines, m3po_alpha0 / m3po_alpha1 the alpha ablation; any of "
                        f"{', '.join(DEMO_METHODS)}")
    p.add_argument("overrides", nargs="*", help="section.key=value (anywhere on the line)")
    return p


def parse_args(argv) -> argparse.Namespace:
    """The demo's arguments; dotted overrides may come before, between or after options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(argv))
    flags = [a for a in extra if a.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    args.overrides = list(args.overrides) + extra
    return args
