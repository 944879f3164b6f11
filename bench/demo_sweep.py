"""A small sweep over the demo's alignment recipe from one base: one JSON line per setting.

    python bench/demo_sweep.py --base assets/demo_base --out runs/demo_sweep [section.key=value ...]
    python bench/demo_sweep.py --task ocr --base assets/demo_base_ocr --only lr=2e-5 ...
    python bench/demo_sweep.py --tiny --dry-run                    # the plan only, in seconds
    python bench/demo_sweep.py --reports baseline=A/report.json beta=0.3=B/report.json

One setting at a time around the config's recipe (not a full grid: each setting is a demo run
of minutes): β, γ (PerPO's reward-gap weighting), lr, K (samples per prompt = list size),
temperature, min_margin, rounds, passes over each round's lists, and sampling from the frozen
reference instead of the policy. Each setting is a separate
`perpo-jax demo --out OUT/<name> --method M demo.base_path=BASE <its overrides> ...` process
(its log OUT/<name>.log beside its run dir). Prints one JSON line per setting ({"setting",
"overrides", "seconds", per method the headline metric and its gain over the base with the
bootstrap interval}), then one summary JSON line (the best setting per method, and the machine).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, however run
from demo_seeds import LOWER_IS_BETTER, METRICS  # noqa: E402
from timing import machine_info  # noqa: E402

# name -> overrides; "baseline" is the config's own recipe
SETTINGS = {
    "baseline": [],
    "beta=0.05": ["loss.beta=0.05"], "beta=0.3": ["loss.beta=0.3"], "beta=1": ["loss.beta=1.0"],
    "gamma=0.25": ["loss.gamma=0.25"], "gamma=1": ["loss.gamma=1.0"],
    "lr=1e-4": ["optim.lr=1e-4"], "lr=1e-3": ["optim.lr=1e-3"],
    "K=4": ["sampling.num_samples=4", "train.num_candidates=4"],
    "K=16": ["sampling.num_samples=16", "train.num_candidates=16"],
    "temperature=0.7": ["sampling.temperature=0.7"],
    "temperature=1.3": ["sampling.temperature=1.3"],
    "min_margin=0.05": ["data.min_margin=0.05"], "min_margin=0.3": ["data.min_margin=0.3"],
    "rounds=6": ["train.rounds=6"], "rounds=24": ["train.rounds=24"],
    "rounds=36": ["train.rounds=36"], "epochs=3": ["train.epochs=3"],
    "lr=2e-4": ["optim.lr=2e-4"], "lr=5e-5": ["optim.lr=5e-5"], "lr=2e-5": ["optim.lr=2e-5"],
    # larger updates: 64 lists per update on the same rounds (half the updates), or on twice
    # the prompts per round (same updates, twice the samples)
    "lists=64": ["train.lists_per_step=64"],
    "lists=64,prompts=1024": ["train.lists_per_step=64", "sampling.prompts_per_round=1024"],
    "from_reference": ["sampling.from_reference=true"],
}
TINY_SETTINGS = {"baseline": [], "beta=0.3": ["loss.beta=0.3"]}
DEFAULT_METHODS = "perpo,dpo"
HEADLINE = {task: metrics[0] for task, metrics in METRICS.items()}  # acc@0.5 | ned


def demo_command(name: str, overrides: list[str], *, base: str, out: Path, methods: str,
                 extra: list[str], task: str = "grounding") -> list[str]:
    """The demo process of one setting (settings' overrides after the user's, so they win)."""
    return [sys.executable, "-m", "perpo_jax.cli", "demo", "--task", task,
            "--out", str(out / name), "--overwrite", "--method", methods,  # its own dir
            f"demo.base_path={base}", *extra,
            *overrides]


def run_setting(cmd: list[str], run_dir: Path) -> tuple[Path, float]:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # stdout stays JSON lines; the log goes beside the run dir (the demo refuses a non-empty --out)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return run_dir / "report.json", time.perf_counter() - start


def setting_line(name: str, overrides: list[str], report: dict, seconds: float | None) -> dict:
    """One setting's JSON line: per method the headline metric, its gain over the base
    ({mean, lo, hi} when the report has it) and the shuffled-image gap."""
    key = HEADLINE.get(report.get("task", "grounding"), "acc@0.5")
    methods = {}
    for method, res in report["results"].items():
        methods[method] = {key: res["metrics"].get(key),
                           "gain": (res.get("gain_over_base") or {}).get(key),
                           "image_gap": (res.get("shuffled") or {}).get("gap")}
    return {"setting": name, "overrides": overrides, "seconds": seconds, "metric": key,
            "methods": methods}


def summary(lines: list[dict]) -> dict:
    """The best setting per method by mean gain over the base (lower NED is a negative gain
    in the report, so 'best' is the largest gain for acc@0.5, the smallest for ned)."""
    best = {}
    for line in lines:
        lower = line["metric"] in LOWER_IS_BETTER
        for method, row in line["methods"].items():
            if row["gain"] is None:
                continue
            score = -row["gain"]["mean"] if lower else row["gain"]["mean"]
            if method not in best or score > best[method]["score"]:
                best[method] = {"setting": line["setting"], "score": score, "gain": row["gain"]}
    return {"summary": True, "settings": [line["setting"] for line in lines],
            "best_by_method": {m: {k: v for k, v in b.items() if k != "score"}
                               for m, b in best.items()},
            "machine": machine_info()}


def _named_reports(items: list[str]) -> list[tuple[str, Path]]:
    """["name=path", ...] -> [(name, path)]; name and path may both contain '=' (beta=0.3=...),
    so the split is at the first '=' whose right side is an existing file."""
    out = []
    for item in items:
        splits = [i for i, c in enumerate(item) if c == "=" and i > 0
                  and Path(item[i + 1:]).is_file()]
        if not splits:
            raise SystemExit(f"--reports {item!r}: expected NAME=PATH of an existing report.json")
        out.append((item[:splits[0]], Path(item[splits[0] + 1:])))
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="base dir (perpo-jax demo --train-base)")
    p.add_argument("--out", default="runs/demo_sweep")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--task", choices=tuple(HEADLINE), default="grounding")
    p.add_argument("--only", nargs="*", default=None, help="run only these settings")
    p.add_argument("--tiny", action="store_true", help="two settings (baseline, beta=0.3)")
    p.add_argument("--dry-run", action="store_true", help="print each setting's command only")
    p.add_argument("--reports", nargs="*", default=None, metavar="NAME=PATH",
                   help="summarise these settings' report.json files, run nothing")
    p.add_argument("overrides", nargs="*", help="passed to every demo run")
    args = p.parse_args(argv)
    lines = []
    if args.reports:
        for name, path in _named_reports(args.reports):
            report = json.loads(path.read_text())
            lines.append(setting_line(name, SETTINGS.get(name, []), report, report.get("seconds")))
            print(json.dumps(lines[-1]), flush=True)
    else:
        settings = TINY_SETTINGS if args.tiny else SETTINGS
        if args.only:
            unknown = sorted(set(args.only) - set(settings))
            if unknown:
                raise SystemExit(f"--only {unknown}: settings are {', '.join(settings)}")
            settings = {k: v for k, v in settings.items() if k in args.only}
        if args.base is None and not args.dry_run:
            raise SystemExit("--base DIR is required (make one with perpo-jax demo --train-base)")
        out = Path(args.out)
        for name, overrides in settings.items():
            cmd = demo_command(name, overrides, base=args.base or "BASE", out=out,
                               methods=args.methods, extra=args.overrides, task=args.task)
            if args.dry_run:
                print(json.dumps({"setting": name, "overrides": overrides, "command": cmd[1:]}))
                continue
            path, seconds = run_setting(cmd, out / name)
            lines.append(setting_line(name, overrides, json.loads(path.read_text()), seconds))
            print(json.dumps(lines[-1]), flush=True)
    if lines:
        print(json.dumps(summary(lines)))
    return lines


if __name__ == "__main__":
    main()
