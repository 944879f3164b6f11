"""The demo's base and report: `perpo-jax demo --train-base` in miniature (the dir loads like a
user's checkpoint and its card's val numbers re-check on a slice), the demo aligning from that
base with perpo + rft (bootstrap intervals, shuffled-image gap), and the report's pure pieces
on hand-made cases."""

import json

import numpy as np
import pytest
from tiny_run import TINY_MODEL

from perpo_jax.demo.base import SHIPPED_BASE, SHIPPED_OCR_BASE, read_card, resolve_base_path
from perpo_jax.demo.report import (ShuffledImages, format_table, image_derangement,
                                   shuffle_gap)
from perpo_jax.eval.bootstrap import paired_bootstrap_gain

# The shared fixture's dataset (tests/conftest.py): 32 train / 8 val 32-px scenes, 2-5 shapes
# with relations and the default shape sides (the schema's defaults; configs/demo_base.yaml's
# task but for its larger sides), so it is reused.
TINY = [TINY_MODEL, "data.num_train=32", "data.num_val=8", "data.image_size=32",
        "data.min_objects=2", "data.max_objects=5", "data.relations=true",
        "data.shape_sides=[0.14,0.2,0.3,0.42]",
        "train.max_length=192", "train.max_response_length=12", "eval.num_examples=8",
        "eval.batch_size=8", "eval.max_new_tokens=8"]


def test_paired_bootstrap_gain_hand_case():
    # identical differences: every resample has the same mean, the interval is a point
    same = paired_bootstrap_gain([0.0, 1.0, 0.0], [0.5, 1.5, 0.5], samples=50)
    assert same["mean"] == same["lo"] == same["hi"] == pytest.approx(0.5)
    # differences [0, 1]: a resample's mean is 0, 0.5 or 1 with p = 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are 0 and 1 and the mean gain is 0.5
    two = paired_bootstrap_gain([1.0, 0.0], [1.0, 1.0], samples=2000, seed=3)
    assert (two["mean"], two["lo"], two["hi"], two["n"]) == (0.5, 0.0, 1.0, 2)
    assert paired_bootstrap_gain([1.0, 0.0], [1.0, 1.0], samples=2000, seed=3) == two
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap_gain([1.0], [1.0, 0.0])


def test_image_derangement_and_shuffled_view():
    perm = image_derangement(7, seed=0)
    assert sorted(perm) == list(range(7)) and not np.any(perm == np.arange(7))
    assert np.array_equal(perm, image_derangement(7, seed=0))
    records = [{"image": f"img{i}", "question": f"q{i}"} for i in range(4)]
    view = ShuffledImages(records, np.array([1, 0]))
    assert [view[i]["image"] for i in range(4)] == ["img1", "img0", "img2", "img3"]
    assert [view[i]["question"] for i in range(4)] == ["q0", "q1", "q2", "q3"]
    assert shuffle_gap({"acc@0.5": 0.6}, {"acc@0.5": 0.1}, "acc@0.5")["gap"] == pytest.approx(0.5)
    assert shuffle_gap({"ned": 0.3}, {"ned": 0.9}, "ned")["gap"] == pytest.approx(0.6)


def test_table_has_one_aligned_column_per_metric():
    gain = {"mean": 0.05, "lo": 0.01, "hi": 0.09}
    lines = format_table({
        "sft_warmup": {"metrics": {"ned": 0.5, "edit_similarity": 0.5, "char_precision": 0.4,
                                   "char_f1": 0.4, "samples_per_s": 3.0}},
        "perpo": {"metrics": {"ned": 0.45, "edit_similarity": 0.55, "char_precision": 0.5,
                              "char_f1": 0.5, "samples_per_s": 3.0},
                  "gain_over_base": {"ned": gain}, "shuffled": {"ned": 0.9, "gap": 0.45},
                  "samples_per_s": 100.0}}).splitlines()
    head = lines[0]
    assert "char_f1" not in head and "ned" in head and "edit_similarity" in head
    # every header ends where its column's cells end (right-aligned, >= 2 spaces between)
    assert "  edit_similarity" in head and "  ned" in head
    assert lines[3].split()[:3] == ["perpo", "0.4500", "0.5500"]
    assert "+0.050 [+0.010,+0.090]" in lines[3]


@pytest.mark.parametrize("base, headline", [(SHIPPED_BASE, "acc@0.5"), (SHIPPED_OCR_BASE, "ned")],
                         ids=["grounding", "ocr"])
def test_shipped_base_loads_and_matches_its_card(tmp_path, base, headline):
    """assets/demo_base (grounding) and assets/demo_base_ocr, each made by the command its card
    records, ground / read imperfectly (Acc@0.5 or NED in the 30-60 % a base worth aligning
    needs), load like a user's checkpoint, re-score the first val examples exactly as
    recorded, and `demo.base_path: auto` picks each for its own task only."""
    from perpo_jax.config import config_from_dict
    from perpo_jax.data import prepare
    from perpo_jax.eval import evaluate
    from perpo_jax.hf import load_pretrained

    card = read_card(str(base))
    assert card["command"].startswith("perpo-jax demo ") and "--train-base --out " in card["command"]
    assert card["val_examples"] == 500 and 0.30 <= card["val_metrics"][headline] <= 0.60
    assert sum(f.stat().st_size for f in base.iterdir()) <= 20 * 2**20
    # its own config and val split (TFDS shuffles records by key, so the first records depend
    # on the split's size), one train example, scored on the first 4 val records
    cfg = config_from_dict(card["config"], [
        f"model.hf_path={base}", f"data.data_dir={tmp_path / 'data'}",
        f"train.out_dir={tmp_path / 'run'}", "data.num_train=1", "eval.num_examples=4"])
    data = prepare.prepare_data(cfg, progress=False)
    res = evaluate(load_pretrained(str(base)), data, cfg, split="val", progress=False)
    assert res.texts == card["val_predictions"][:4]
    # auto: the shipped base for its own task, the in-process warm-up for another task
    same_task = config_from_dict(card["config"], ["demo.base_path=auto"])
    assert resolve_base_path(same_task)[0] == str(base)
    other_task = config_from_dict(card["config"], ["demo.base_path=auto", "data.seed=7"])
    path, why = resolve_base_path(other_task)
    assert path is None and "other tasks" in why and "'seed': (0, 7)" in why


def test_train_base_then_align_from_it(shared, tmp_path, capsys):
    """`demo --train-base` in miniature, the dir loads as an HF checkpoint + processor, the
    card re-checks on a slice, a second --train-base into it is refused, and the demo aligns
    from it (rft: SFT on the best sampled candidate; perpo's demo path: tests/test_loop.py)."""
    from perpo_jax import cli
    from perpo_jax.demo import recipes as demo_recipes, run as demo
    from perpo_jax.config import config_from_dict
    from perpo_jax.data import prepare
    from perpo_jax.data.processor import LlavaPromptProcessor
    from perpo_jax.demo.report import example_scores
    from perpo_jax.eval import evaluate
    from perpo_jax.hf import load_pretrained
    from perpo_jax import assemble

    _, data = shared
    base_dir = tmp_path / "base"
    common = [f"data.data_dir={data.data_dir}", *TINY]
    base_args = ["--train-base", "--out", str(base_dir), f"train.out_dir={tmp_path / 'run'}",
                 "demo.sft_rounds=1", "demo.sft_steps=1", "demo.sft_lists_per_step=8",
                 "demo.sft_prompts_per_round=8", "demo.base_warmup_rounds=1", *common]
    card = demo.main(base_args)
    # stage 1 ran first: one SFT update on one-shape scenes, with the task's own tokenizer
    stage = [json.loads(line) for line in
             (tmp_path / "run" / "base_sft_one_shape" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in stage if "loss" in r]
    one = demo_recipes.one_shape_config(config_from_dict({}, [*common, "demo.base_warmup_rounds=3"]),
                                data.processor_dir)
    assert (one.data.min_objects, one.data.max_objects, one.data.relations) == (1, 1, False)
    assert one.data.tokenizer == data.processor_dir and one.demo.sft_rounds == 3

    saved = json.loads((base_dir / "base_card.json").read_text())
    assert saved["command"].startswith("perpo-jax demo --train-base --out ")
    assert saved["seconds"] > 0 and saved["machine"]["cpus"] >= 1
    assert saved["val_examples"] == 8 and len(saved["val_predictions"]) == 8
    assert set(saved["val_metrics"]) >= {"acc@0.5", "mean_iou"}
    assert saved["config"]["demo"]["sft_steps"] == 1 and saved["task"]["relations"] is True
    assert saved["config"]["demo"]["base_warmup_rounds"] == 1
    assert saved["task"]["shape_sides"] == [0.14, 0.20, 0.30, 0.42]
    assert saved["val_metrics"]["mean_iou"] == pytest.approx(
        np.mean(saved["val_scores"]["mean_iou"]))
    assert card["val_metrics"] == saved["val_metrics"]

    # loads like a user's checkpoint: weights, then the processor both ways
    model = load_pretrained(str(base_dir))
    assert LlavaPromptProcessor.from_pretrained(str(base_dir)).patch_size == 8
    processor = LlavaPromptProcessor.from_hf(str(base_dir))
    assert len(processor.tokenizer) == len(data.processor.tokenizer)
    # the recorded val numbers re-check on a slice, through the model.hf_path path
    cfg = config_from_dict({}, [f"model.hf_path={base_dir}", *common, "eval.num_examples=4"])
    sliced = prepare.prepare_data(cfg, progress=False)
    assemble.check_model_processor(model.config, sliced.processor)
    res = evaluate(model, sliced, cfg, split="val", progress=False)
    assert res.texts == saved["val_predictions"][:4]
    recomputed = example_scores("grounding", res.texts, res.gt)
    np.testing.assert_allclose(recomputed["mean_iou"], saved["val_scores"]["mean_iou"][:4])

    # a non-empty --out is refused before any work (status 1, one line), as export refuses
    assert cli.main(["demo", *base_args]) == 1
    assert "--overwrite" in capsys.readouterr().err

    out = tmp_path / "demo"
    report = demo.main([
        "--out", str(out), "--method", "rft", f"demo.base_path={base_dir}", *common,
        "sampling.prompts_per_round=8", "sampling.num_samples=4", "sampling.max_new_tokens=8",
        "train.num_candidates=4", "train.lists_per_step=8", "train.rounds=1", "train.steps=1",
        "data.min_margin=0.0", "demo.bootstrap_samples=200",
    ])
    assert report["base"]["path"] == str(base_dir) and not report["base"]["trained_in_process"]
    assert report["base"]["card"]["val_metrics"] == saved["val_metrics"]
    results = report["results"]
    assert set(results) == {"sft_warmup", "rft"}
    # the loaded base scores on the demo's val exactly what its card recorded
    assert results["sft_warmup"]["metrics"]["mean_iou"] == pytest.approx(
        saved["val_metrics"]["mean_iou"])
    for gain in results["rft"]["gain_over_base"].values():
        assert gain["lo"] <= gain["mean"] <= gain["hi"] and gain["n"] == 8
    assert set(results["rft"]["shuffled"]) == {"acc@0.5", "gap"}
    assert results["rft"]["mean_round_reward"]  # rft trained on sampled candidates
    written = json.loads((out / "report.json").read_text())
    assert "scores" not in written["results"]["rft"]
    assert "gain acc@0.5 [95% CI]" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["grounding", "ocr"])
def test_train_base_config_makes_the_demos_task(task):
    """`perpo-jax demo [--task ocr] --train-base` trains a base for exactly the task the demo
    of that task aligns on (so `demo.base_path: auto` finds it), from scratch (base_path null)."""
    from perpo_jax.demo import run as demo
    from perpo_jax.demo.base import task_signature

    base_cfg = demo.demo_config(demo.parse_args(["--task", task, "--train-base", "--out", "X"]))
    demo_cfg = demo.demo_config(demo.parse_args(["--task", task]))
    assert task_signature(base_cfg.data) == task_signature(demo_cfg.data)
    assert base_cfg.data.task == task and base_cfg.demo.base_path is None
    assert demo_cfg.demo.base_path == "auto"
    assert base_cfg.model == demo_cfg.model  # the same tiny LLaVA (and tokenizer size)
