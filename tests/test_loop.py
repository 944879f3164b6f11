"""The PerPO loop end to end on tiny everything: online rounds, offline official lists,
exact resume mid-round, and the demo pipeline (all methods, report, HF export)."""

import json
import os

import jax
import numpy as np
import pytest

from tiny_run import TINY_MODEL, tiny_cfg

from perpo_jax.train.loop import train

def _params(result):
    from flax import nnx

    return jax.tree.map(np.asarray, nnx.state(result.model, nnx.Param))


def test_online_rounds_train_checkpoint_and_log(shared, tmp_path):
    _, data = shared
    cfg = tiny_cfg(tmp_path, "data.task=test_digits", f"data.data_dir={data.data_dir}",
                   "lora.enabled=true", "lora.rank=4", "lora.alpha=8.0")
    result = train(cfg, data=data, progress=False)
    assert result.steps == 4 and not result.preempted
    assert [r["round"] for r in result.rounds] == [0, 1]
    assert all(r["lists_kept"] > 0 for r in result.rounds)
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and any(h["num_valid_lists"] > 0 for h in result.history)
    assert os.path.isdir(os.path.join(cfg.train.out_dir, "checkpoints", "4"))
    rows = [json.loads(line) for line in open(os.path.join(cfg.train.out_dir, "metrics.jsonl"))]
    assert {r["kind"] for r in rows} == {"step", "round"}
    assert os.path.getsize(os.path.join(cfg.train.out_dir, "curves.png")) > 1000
    assert os.path.exists(os.path.join(cfg.train.out_dir, "lists", "host000", "round_00001.npz"))


def test_resume_mid_round_continues_exactly(shared, tmp_path, capsys):
    _, data = shared
    common = ("data.task=test_digits", f"data.data_dir={data.data_dir}", "loss.name=perpo")
    straight = train(tiny_cfg(tmp_path / "a", *common), data=data, progress=False)
    cfg_b = tiny_cfg(tmp_path / "b", *common)
    first = train(cfg_b, data=data, progress=False, stop_at_step=3)  # inside round 1
    assert first.preempted and first.steps == 3
    capsys.readouterr()
    resumed = train(cfg_b, data=data, progress=False)
    assert f"resuming from step 3 of 4 (checkpoint {cfg_b.train.out_dir}/checkpoints)" in \
        capsys.readouterr().out
    assert resumed.steps == 4 and [h["step"] for h in resumed.history] == [4]
    a, b = _params(straight), _params(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_resuming_a_different_run_or_restarting_over_one_is_refused(shared, tmp_path):
    from perpo_jax.config import ConfigError

    _, data = shared
    common = ("data.task=test_digits", f"data.data_dir={data.data_dir}", "train.rounds=1",
              "train.steps=1")
    train(tiny_cfg(tmp_path, *common), data=data, progress=False)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        train(tiny_cfg(tmp_path, *common, "optim.lr=5e-4"), data=data, progress=False)
    with pytest.raises(ConfigError, match=r"checkpoint\.resume=false"):
        train(tiny_cfg(tmp_path, *common, "checkpoint.resume=false"), data=data, progress=False)


def test_offline_official_json_lists(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    entries = []
    for i in range(8):
        Image.new("RGB", (40, 30), (20 * i, 200, 10)).save(tmp_path / "img" / f"{i}.jpg")
        entries.append({
            "image_id": i, "image_path": f"{i}.jpg",
            "question": "Please provide the bounding box coordinate of the region this sentence "
                        f"describes: thing {i}",
            "answer": "[0.1, 0.2, 0.5, 0.6]",
            "answers_gen": ["[0.1, 0.2, 0.5, 0.6]", "[0.12, 0.2, 0.5, 0.6]", "[0.6, 0.6, 0.9, 0.9]"],
            "iou_scores": [1.0, 0.95, 0.0],
        })
    (tmp_path / "lists.json").write_text(json.dumps(entries, indent=2))
    cfg = tiny_cfg(tmp_path, "data.source=official_json", f"data.path={tmp_path / 'lists.json'}",
                   f"data.image_dir={tmp_path / 'img'}", "train.mode=offline", "train.epochs=2",
                   "train.steps=0", "data.min_margin=0.8", "sampling.prompts_per_round=8")
    result = train(cfg, data=None, progress=False)
    # 8 lists / 8 per step = 1 step per round, 2 epochs = 2 rounds
    assert result.steps == 2 and len(result.rounds) == 2
    assert result.rounds[0]["lists_kept"] == 8
    assert result.history[0]["num_valid_lists"] == 8
    assert result.history[0]["pair_accuracy"] >= 0.0 and np.isfinite(result.history[1]["loss"])


def test_demo_pipeline_all_methods_report_and_export(shared, tmp_path):
    from perpo_jax.demo import run as demo

    _, data = shared
    out = tmp_path / "demo"
    # dpo / lipo are perpo's pipeline with another loss (tests/test_step.py); rft from a
    # shipped-style base: tests/test_demo_base.py
    report = demo.main([
        "--out", str(out), "--method", "perpo,sft", f"data.data_dir={data.data_dir}",
        "data.num_train=32",
        "data.num_val=8", "data.image_size=32", TINY_MODEL, "sampling.prompts_per_round=8",
        "sampling.num_samples=4", "sampling.max_new_tokens=8", "train.num_candidates=4",
        "train.lists_per_step=8", "train.rounds=1", "train.steps=1", "train.max_length=192",
        "train.max_response_length=12", "demo.sft_rounds=1", "demo.sft_lists_per_step=8",
        "demo.sft_prompts_per_round=8", "eval.num_examples=8",
        "eval.batch_size=8", "eval.max_new_tokens=8", "data.min_margin=0.0",
    ])
    assert set(report["results"]) == {"sft_warmup", "perpo", "sft"}
    for res in report["results"].values():
        assert 0.0 <= res["metrics"]["acc@0.5"] <= 1.0
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["results"]) == set(report["results"])
    for png in ("methods.png", "val_boxes.png", "perpo/curves.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "perpo" / "checkpoints").is_dir()
    from transformers import LlavaForConditionalGeneration

    _, info = LlavaForConditionalGeneration.from_pretrained(out / "perpo_hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
