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
