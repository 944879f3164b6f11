"""bench/accelerator.py runs unchanged on CPU at toy width and prints the documented JSON.

In this process, on conftest's 8 fake CPU devices: the mesh spans all of them (fsdp 8), so 2
requested lists become 8. Timings are never asserted; the FLOPs must be the FLOP model's for
that shape, MFU null with its reason (no CPU peak), and the chip table must give each real
`device_kind` string its vendor figure.
"""

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from perpo_jax import flop_model

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "accelerator.py"


@pytest.fixture(scope="module")
def accel():
    spec = importlib.util.spec_from_file_location("bench_accelerator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(accel, capsys, *argv) -> dict:
    accel.main(["--tiny", "--repeats", "1", *argv])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def tiny_dims(accel, *argv) -> dict:
    args = accel.parse_args(["--tiny", *argv])
    cfg = accel.model_config(args)
    return flop_model.model_dims(cfg, prompt=cfg.num_image_tokens + args.prompt_text,
                                 response=args.response_len, candidates=args.candidates)


def test_tiny_run_reports_tokens_flops_and_no_cpu_mfu(accel, capsys):
    out = run_main(accel, capsys)
    assert out["device"] == {"kind": "cpu", "platform": "cpu", "count": jax.device_count(),
                             "peak": None}
    assert "cpu" in out["mfu_unavailable_reason"]
    shape = out["config"]["shape"]
    assert out["config"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert (shape["lists_requested"], shape["lists"]) == (2, 8)  # every device holds a list
    assert shape["prompt_tokens"] == shape["image_tokens"] + 6 == 10
    assert out["config"]["training"]["mode"] == "lora"
    assert out["config"]["params_lora"] > 0 and out["config"]["params_trainable"] > out[
        "config"]["params_lora"]  # the projector trains too
    dims = tiny_dims(accel)
    train, sampler = out["train_step"], out["sampler"]
    for report in (train, sampler):
        assert report["seconds"]["median"] > 0 and report["tokens_per_s"] > 0
        assert report["achieved_tflop_per_s"] > 0 and report["mfu"] is None
    # train: 8 lists x (10 prompt + 4 x 5 candidate tokens); FLOPs = the model's for them
    assert train["tokens_per_step"] == 8 * (10 + 4 * 5)
    assert train["candidate_tokens_per_step"] == 8 * 4 * 5
    expected = flop_model.train_step_flops(dims, lists=8, lora_rank=8)
    assert train["model_flops_per_step"] == expected["total"]
    assert train["model_flops_breakdown"]["remat_recompute"] == 0
    assert train["tokens_per_s"] == pytest.approx(
        train["tokens_per_step"] / train["seconds"]["median"], rel=1e-3)
    assert train["skipped_updates"] == 0 and train["xla_cost_analysis_flops_per_device"] > 0
    # sampler: 8 prompts x K = 4 samples x R = 5 tokens, every sample to the end
    expected = flop_model.sampler_flops(dims, prompts=8, samples=4, new_tokens=5)
    assert sampler["generated_tokens"] == 8 * 4 * 5
    assert sampler["model_flops"] == expected["total"]
    assert sampler["achieved_tflop_per_s"] == pytest.approx(
        expected["total"] / sampler["seconds"]["median"] / 1e12, rel=1e-3)


def test_full_finetune_with_the_reference_in_the_step_is_counted_as_such(accel):
    """The flags reach the FLOP model (no second run: its compiles would double the test)."""
    args = accel.parse_args(["--tiny", "--full-finetune", "--ref-in-step", "--naive", "--remat"])
    times = {"median_s": 2.0, "min_s": 1.5, "first_s": 9.0}
    report = accel.train_report(args, tiny_dims(accel), 8, times, 1.0, None, 8, None,
                                {"loss": 0.5, "skipped": 0})
    expected = flop_model.train_step_flops(tiny_dims(accel), lists=8, shared=False, train="full",
                                           lora_rank=0, reference_in_step=True, remat=True)
    assert report["model_flops_per_step"] == expected["total"]
    assert report["model_flops_breakdown"]["reference_forward"] > 0
    assert report["model_flops_breakdown"]["remat_recompute"] == 0  # model FLOPs: none
    assert report["executed_flops_per_step"] > report["model_flops_per_step"]  # dense + remat
    assert report["mfu"] is None and report["tokens_per_s"] == 8 * (10 + 4 * 5) / 2.0


@pytest.mark.parametrize("kind, chip, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H200", "H200 SXM", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100-SXM4-40GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("TPU v4", "TPU v4", 275.0),
    ("TPU v5 lite", "TPU v5e", 197.0),
    ("TPU v5e", "TPU v5e", 197.0),
    ("TPU v5", "TPU v5p", 459.0),
    ("TPU v5p", "TPU v5p", 459.0),
    ("TPU v6 lite", "TPU v6e", 918.0),
])
def test_chip_table_matches_device_kinds(accel, kind, chip, tflops):
    peak = accel.peak_bf16(kind)
    assert (peak["chip"], peak["peak_bf16_dense_tflops"]) == (chip, tflops)
    assert peak["source"]


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "TPU v4 lite",
                                  "TPU v3", "NVIDIA GeForce RTX 4090"])
def test_unknown_device_kinds_have_no_peak(accel, kind):
    assert accel.peak_bf16(kind) is None


def test_mfu_divides_by_every_chip_s_peak(accel):
    peak = accel.peak_bf16("NVIDIA H100 80GB HBM3")
    util = accel.utilisation(989e12, 1.0, 2, peak)  # one chip's peak of work on two chips
    assert util == {"achieved_tflop_per_s": 989.0, "mfu": 0.5}
    assert accel.utilisation(1e12, 2.0, 1, None) == {"achieved_tflop_per_s": 0.5, "mfu": None}
