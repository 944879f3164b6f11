"""bench/demo_seeds.py's aggregation: means, paired gains and the per-seed ordering check.

The demo runs themselves take minutes each, so this feeds hand-made report.json files through
`--reports` (the same path the script takes after running seeds) and checks the numbers
against values worked out by hand.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "demo_seeds.py"

# seed -> method -> (acc@0.5, mean_iou)
SEEDS = {
    0: {"sft_warmup": (0.10, 0.20), "perpo": (0.14, 0.26), "dpo": (0.12, 0.22)},
    1: {"sft_warmup": (0.20, 0.30), "perpo": (0.22, 0.32), "dpo": (0.24, 0.31)},
}


def write_reports(tmp_path) -> list[str]:
    paths = []
    for seed, methods in SEEDS.items():
        results = {m: {"metrics": {"acc@0.5": a, "mean_iou": i}} for m, (a, i) in methods.items()}
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"results": results, "seconds": 100.0 + seed}))
        paths.append(str(path))
    return paths


def test_aggregates_reports_into_one_json(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reports", *write_reports(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert out["demo_seconds"] == [100.0, 101.0]
    perpo = out["methods"]["perpo"]["acc@0.5"]
    assert perpo["mean"] == pytest.approx(0.18)
    assert perpo["sd"] == pytest.approx(0.04 * 2 ** 0.5)  # sample sd of 0.14, 0.22
    gain = out["gain_over_sft_warmup"]["perpo"]["acc@0.5"]
    assert gain["values"] == pytest.approx([0.04, 0.02])
    assert gain["mean"] == pytest.approx(0.03)
    assert "sft_warmup" not in out["gain_over_sft_warmup"]
    # seed 0: 0.14 > 0.12 > 0.10 holds; seed 1: DPO 0.24 beats PerPO 0.22, so it does not
    assert out["perpo_gt_dpo_gt_sft_per_seed"]["acc@0.5"] == [True, False]
    assert out["perpo_gt_dpo_gt_sft_per_seed"]["mean_iou"] == [True, True]


def test_m3po_reports_without_dpo_aggregate_pope_f1(tmp_path):
    """The M3PO comparison trains no plain `dpo`: the orderings have no seed to judge, and
    shapes-POPE F1 (in every row of these reports) is aggregated like the other metrics."""
    paths = []
    for seed, (warm, m3po) in enumerate([(0.5, 0.7), (0.6, 0.65)]):
        results = {m: {"metrics": {"acc@0.5": 0.1, "mean_iou": 0.2, "pope_f1": f1}}
                   for m, f1 in (("sft_warmup", warm), ("m3po", m3po))}
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps({"results": results, "seconds": 1.0}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reports", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["methods"]["m3po"]["pope_f1"]["mean"] == pytest.approx(0.675)
    assert out["gain_over_sft_warmup"]["m3po"]["pope_f1"]["values"] == pytest.approx([0.2, 0.05])
    assert out["perpo_gt_dpo_gt_sft_per_seed"] == {"acc@0.5": [], "mean_iou": []}


def test_ocr_reports_order_by_lower_ned(tmp_path):
    """OCR demos (`--task ocr`): NED, edit similarity and char F1 are summarised, and the
    orderings read NED as lower-is-better."""
    ned = {0: {"sft_warmup": 0.50, "perpo": 0.40, "dpo": 0.45, "sft": 0.48},
           1: {"sft_warmup": 0.50, "perpo": 0.47, "dpo": 0.44, "sft": 0.49}}
    paths = []
    for seed, methods in ned.items():
        results = {m: {"metrics": {"ned": v, "edit_similarity": 1 - v, "char_f1": 1 - v}}
                   for m, v in methods.items()}
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps({"task": "ocr", "results": results, "seconds": 1.0}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--reports", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["methods"]["perpo"]) == {"ned", "edit_similarity", "char_f1"}
    assert out["gain_over_sft_warmup"]["perpo"]["ned"]["values"] == pytest.approx([-0.10, -0.03])
    # seed 0: NED 0.40 < 0.45 < 0.48 holds; seed 1: DPO's 0.44 beats PerPO's 0.47
    assert out["perpo_gt_dpo_gt_continued_sft_per_seed"]["ned"] == [True, False]
    assert out["perpo_gt_dpo_gt_continued_sft_per_seed"]["edit_similarity"] == [True, False]


def test_seeds_align_from_a_given_base(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import demo_seeds
    finally:
        sys.path.remove(str(SCRIPT.parent))
    cmd = demo_seeds.seed_command(2, tmp_path, ["eval.num_examples=4"], "assets/demo_base")
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "seed2")
    assert f"demo.base_path={Path('assets/demo_base').resolve()}" in cmd
    assert cmd[-1] == "eval.num_examples=4" and "train.seed=2" in cmd
    no_base = demo_seeds.seed_command(0, tmp_path, [], None)
    assert not any(c.startswith("demo.base_path") for c in no_base)
    assert no_base[no_base.index("--task") + 1] == "grounding"
    ocr = demo_seeds.seed_command(0, tmp_path, [], None, task="ocr")
    assert ocr[ocr.index("--task") + 1] == "ocr"


SWEEP = SCRIPT.parent / "demo_sweep.py"


def test_sweep_tiny_plan_and_report_summary(tmp_path):
    """`demo_sweep.py --tiny --dry-run`: one JSON line per setting, each a demo command from the
    base; `--reports`: the per-setting lines (headline, gain interval, image gap) + summary."""
    proc = subprocess.run([sys.executable, str(SWEEP), "--tiny", "--dry-run", "--base", "B",
                           "--out", str(tmp_path), "eval.num_examples=4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [p["setting"] for p in plan] == ["baseline", "beta=0.3"]
    assert plan[1]["command"][-2:] == ["eval.num_examples=4", "loss.beta=0.3"]
    assert "demo.base_path=B" in plan[0]["command"]

    def report(perpo_gain):
        gain = {"mean": perpo_gain, "lo": perpo_gain - 0.02, "hi": perpo_gain + 0.02}
        return {"task": "grounding", "seconds": 9.0, "results": {
            "sft_warmup": {"metrics": {"acc@0.5": 0.4}},
            "perpo": {"metrics": {"acc@0.5": 0.4 + perpo_gain}, "gain_over_base": {"acc@0.5": gain},
                      "shuffled": {"acc@0.5": 0.05, "gap": 0.35 + perpo_gain}}}}

    paths = []
    for name, gain in (("baseline", 0.02), ("beta=0.3", 0.06)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(report(gain)))
        paths.append(f"{name}={path}")
    proc = subprocess.run([sys.executable, str(SWEEP), "--reports", *paths],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *lines, summary = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[1]["setting"] == "beta=0.3" and lines[1]["overrides"] == ["loss.beta=0.3"]
    assert lines[1]["methods"]["perpo"]["gain"]["mean"] == pytest.approx(0.06)
    assert lines[1]["methods"]["perpo"]["image_gap"] == pytest.approx(0.41)
    assert summary["best_by_method"]["perpo"]["setting"] == "beta=0.3"
    assert summary["machine"]["cpu_count"] >= 1
