"""bench/list_step.py runs end to end at a toy size and prints the documented JSON.

Timings are never asserted (shared CI machines); only the schema, that every variant trained
without skipped updates, and the log-prob parity with transformers on the same weights.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "list_step.py"
TOP_LEVEL = ("machine", "config", "ours_shared_s", "ours_naive_s", "torch_naive_s",
             "speedup_shared_vs_naive", "flop_ratio_naive_over_shared", "speedup_vs_torch",
             "logp_max_abs_diff", "compile_s", "memory", "timings", "flops", "last_loss", "skipped_updates")


def run_tiny() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the benchmark runs on one real device, not conftest's 8 fakes
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected ONE JSON line on stdout, got {proc.stdout!r}"
    return json.loads(lines[0])


def test_tiny_benchmark_prints_the_json_schema():
    out = run_tiny()
    for key in TOP_LEVEL:
        assert key in out, key
    for key in ("platform", "cpu_count", "jax", "torch", "device_kind"):
        assert key in out["machine"], key
    assert out["config"]["tiny"] is True and out["config"]["candidates_K"] == 4
    for key in ("ours_shared_s", "ours_naive_s", "torch_naive_s", "speedup_shared_vs_naive",
                "speedup_vs_torch", "speedup_shared_vs_naive_min", "speedup_vs_torch_min"):
        assert isinstance(out[key], float) and out[key] > 0, key
    # the FLOP bound: shared never costs more than naive; the paper's shape gives ~11.7x
    assert out["flop_ratio_naive_over_shared"] > 1
    assert out["flops"]["paper_llava_1_5_7b"]["ratio"] == pytest.approx(11.7, abs=0.2)
    # same weights, same batch: our summed log-probs equal transformers' (float32)
    assert out["logp_max_abs_diff"] < 1e-3
    assert out["logp_max_abs_diff_shared_vs_naive"] < 1e-4
    assert out["skipped_updates"] == {"shared": 0, "naive": 0}
    assert all(math.isfinite(v) for v in out["last_loss"].values())
    # XLA's memory_analysis of each compiled step (CPU provides it)
    for name in ("ours_shared", "ours_naive"):
        assert out["memory"][name]["peak_bytes"] > 0, out["memory"][name]
