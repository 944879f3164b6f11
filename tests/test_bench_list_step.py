"""bench/list_step.py runs end to end at a toy size and prints the documented JSON.

Timings are never asserted (shared CI machines); only the schema, that every variant trained
without skipped updates, and the log-prob parity with transformers on the same weights —
for the LLaVA-1.5 shape (transformers in a child process) and for `--anyres` (LLaVA-NeXT
tiles, transformers' LlavaNextForConditionalGeneration in the benchmark's own process).
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


def run_tiny(*extra: str) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the benchmark runs on one real device, not conftest's 8 fakes
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *extra], capture_output=True, text=True,
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
    assert out["torch_process"] == "child"  # the default: transformers never loads in ours
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


def test_tiny_anyres_benchmark_reports_the_next_shape():
    out = run_tiny("--anyres", "--torch-in-process")  # the other mode of the torch side
    assert out["torch_process"] == "same"
    for key in TOP_LEVEL + ("anyres",):
        assert key in out, key
    shape = out["anyres"]
    # toy tiles 28 px / patch 14 (2 x 2 features), NeXT's pinpoints: a 2 x 2-tile image runs
    # base + 4 tiles; its prompt holds 4 base + 4 rows x (4 + newline) = 24 image tokens
    assert shape["model_type"] == "llava_next" and shape["tiles"] == shape["tiles_used"] == 5
    assert shape["image_size_hw"] == shape["best_resolution_hw"] == [56, 56]
    assert shape["image_tokens"] == shape["image_tokens_transformers"] == 4 + 4 * 5
    assert shape["prompt_tokens"] == shape["image_tokens"] + shape["prompt_text_tokens"]
    assert (shape["candidates_K"], shape["response_tokens"]) == (5, 6)
    assert out["config"]["anyres"] is True and out["config"]["prompt_tokens"] == shape["prompt_tokens"]
    for key in ("ours_shared_s", "ours_naive_s", "torch_naive_s", "speedup_shared_vs_naive",
                "speedup_vs_torch"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["flop_ratio_naive_over_shared"] > 1
    assert out["flops"]["llava_next_7b_anyres"]["ratio"] > 1
    # same weights, same batch: shared == naive, and both equal transformers' LLaVA-NeXT
    assert out["logp_max_abs_diff_shared_vs_naive"] < 1e-4
    assert out["logp_max_abs_diff"] < 1e-3
    assert out["skipped_updates"] == {"shared": 0, "naive": 0}
    loss = out["last_loss"]
    assert all(math.isfinite(v) for v in loss.values())
    assert loss["ours_shared"] == pytest.approx(loss["ours_naive"], abs=1e-5)
    assert loss["torch_naive"] == pytest.approx(loss["ours_naive"], abs=1e-4)
    for name in ("ours_shared", "ours_naive"):
        assert out["memory"][name]["peak_bytes"] > 0, out["memory"][name]
