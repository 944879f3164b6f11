"""bench/rewards.py runs at a toy size, with and without rapidfuzz (a bench-only extra).

Timings are never asserted; only the JSON schema and that both sides agree when both run.
"""
import importlib.util
import json
import runpy
import sys
from pathlib import Path

SCRIPT = str(Path(__file__).resolve().parents[1] / "bench" / "rewards.py")
ARGS = ["rewards.py", "--num-texts", "50", "--pages", "3", "--page-chars", "150", "--repeats", "1"]


def run_bench(monkeypatch, capsys, hide_rapidfuzz: bool) -> dict:
    monkeypatch.setattr(sys, "argv", ARGS)
    if hide_rapidfuzz:  # importing a module mapped to None raises ImportError
        for name in ("rapidfuzz", "rapidfuzz.distance"):
            monkeypatch.setitem(sys.modules, name, None)
    runpy.run_path(SCRIPT, run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_rewards_bench_without_rapidfuzz(monkeypatch, capsys):
    out = run_bench(monkeypatch, capsys, hide_rapidfuzz=True)
    assert out["ocr"]["rapidfuzz"] == "rapidfuzz not installed"
    assert out["ocr"]["page_pairs"] == 3 and out["ocr"]["levenshtein_batch_ms_per_page_pair"] > 0
    assert out["iou_num_texts"] == 50


def test_rewards_bench_with_rapidfuzz_if_installed(monkeypatch, capsys):
    if importlib.util.find_spec("rapidfuzz") is None:
        return  # the bench-only extra is absent: the test above covers this machine
    out = run_bench(monkeypatch, capsys, hide_rapidfuzz=False)
    assert out["ocr"]["identical_distances"] is True
