"""The demo over several seeds: mean ± sd per method and whether PerPO > DPO > SFT held.

    python bench/demo_seeds.py --seeds 0 1 2 --out runs/demo_seeds [section.key=value ...]
    python bench/demo_seeds.py --base assets/demo_base ...      # align from a shipped base
    python bench/demo_seeds.py --task ocr ...                    # perpo-jax demo --task ocr
    python bench/demo_seeds.py --reports A/report.json B/report.json   # aggregate only

Each seed is a separate `perpo-jax demo --out OUT/seedS train.seed=S ...` process (the same
command a user runs, so its wall time is the user's; its output goes to OUT/seedS.log,
beside the run dir: the demo refuses an --out that holds anything but its dataset).
Prints ONE JSON object (not a test).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, however run
from timing import machine_info  # noqa: E402

# per task: the metrics summarised, the first one the headline; which are lower-is-better
METRICS = {"grounding": ("acc@0.5", "mean_iou"), "ocr": ("ned", "edit_similarity", "char_f1")}
LOWER_IS_BETTER = ("ned",)
OPTIONAL_METRICS = ("pope_f1",)
ORDER = ("perpo", "dpo", "sft_warmup")  # the paper's claim: PerPO > DPO > SFT
ISSUE_ORDER = ("perpo", "dpo", "sft")  # issue 16's goal: PerPO > DPO > continued SFT


def seed_command(seed: int, out: Path, overrides: list[str], base: str | None,
                 task: str = "grounding") -> list[str]:
    """One seed's demo process; with `base`, every seed aligns from that same base dir (the
    seed then changes the sampling and the data order, not the starting model)."""
    base_override = [] if base is None else [f"demo.base_path={os.path.abspath(base)}"]
    return [sys.executable, "-m", "perpo_jax.cli", "demo", "--task", task,
            "--out", str(out / f"seed{seed}"), "--overwrite",  # its own dir: a rerun replaces it
            f"train.seed={seed}", *base_override, *overrides]


def run_seed(seed: int, out: Path, overrides: list[str],
             base: str | None = None, task: str = "grounding") -> tuple[Path, float]:
    run_dir = out / f"seed{seed}"
    cmd = seed_command(seed, out, overrides, base, task)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The demo's own prints go to a log beside its run dir so stdout stays one JSON object.
    with open(out / f"seed{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return run_dir / "report.json", time.perf_counter() - start


def _stats(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals),
            "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}


def _order_held(reports: list[dict], order: tuple, key: str) -> list[bool]:
    """Per seed whose report has every method of `order`: was order[0] better than order[1]
    than ... on `key` (lower for LOWER_IS_BETTER metrics)?"""
    sign = -1.0 if key in LOWER_IS_BETTER else 1.0
    return [all(sign * r["results"][a]["metrics"][key] > sign * r["results"][b]["metrics"][key]
                for a, b in zip(order, order[1:]))
            for r in reports if all(m in r["results"] for m in order)]


def summarise(reports: list[dict]) -> dict:
    methods = list(reports[0]["results"])
    metrics = METRICS[reports[0].get("task", "grounding")]
    # shapes-POPE F1 where every report has it (demo.pope_images > 0)
    keys = metrics + tuple(k for k in OPTIONAL_METRICS
                           if all(k in res["metrics"] for r in reports
                                  for res in r["results"].values()))

    def metric(m: str, key: str) -> list[float]:
        return [r["results"][m]["metrics"][key] for r in reports if m in r["results"]]

    table = {m: {key: _stats(metric(m, key)) for key in keys} for m in methods}
    # Paired differences: the warm-up's seed-to-seed spread dominates each method's sd, but
    # every method starts from its own seed's warm-up, so method - warm-up per seed is the gain.
    gains = {m: {key: _stats([r["results"][m]["metrics"][key]
                              - r["results"]["sft_warmup"]["metrics"][key]
                              for r in reports if m in r["results"]]) for key in keys}
             for m in methods if m != "sft_warmup"}
    # an ordering whose methods a run did not train is reported as [] (no seed to judge)
    held = {key: _order_held(reports, ORDER, key) for key in metrics}
    held_sft = {key: _order_held(reports, ISSUE_ORDER, key) for key in metrics}
    # each seed's own paired bootstrap interval of the gain (reports of demos that have them)
    intervals = {m: [r["results"][m].get("gain_over_base") for r in reports if m in r["results"]]
                 for m in methods if m != "sft_warmup"}
    gaps = {m: [(r["results"][m].get("shuffled") or {}).get("gap") for r in reports
                if m in r["results"]] for m in methods}
    return {"methods": table, "gain_over_sft_warmup": gains, "perpo_gt_dpo_gt_sft_per_seed": held,
            "perpo_gt_dpo_gt_continued_sft_per_seed": held_sft,
            "gain_intervals_per_seed": intervals, "image_gap_per_seed": gaps}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--task", choices=tuple(METRICS), default="grounding")
    p.add_argument("--out", default="runs/demo_seeds")
    p.add_argument("--reports", nargs="*", default=None, help="aggregate these report.json files")
    p.add_argument("--base", default=None, help="base dir every seed aligns from "
                   "(demo.base_path; default: the demo's own choice)")
    p.add_argument("overrides", nargs="*", help="passed to every demo run")
    args = p.parse_args(argv)
    walls = []
    if args.reports:
        paths = [Path(r) for r in args.reports]
    else:
        paths = []
        for seed in args.seeds:
            path, wall = run_seed(seed, Path(args.out), args.overrides, args.base, args.task)
            paths.append(path)
            walls.append(wall)
    reports = [json.loads(path.read_text()) for path in paths]
    out = {
        "machine": machine_info(),
        "reports": [str(p) for p in paths],
        "base": args.base,
        "demo_seconds": walls or [r.get("seconds") for r in reports],
        **summarise(reports),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
