"""POPE: metrics with both parsers on hand-made answers, the question-file reader, the
synthetic shapes_pope set and its negative-sampling strategies."""

import json

import numpy as np
import pytest
from PIL import Image

from perpo_jax.eval.pope import exact_answer, pope_answer, pope_metrics, pope_summary


def test_official_pope_parser():
    assert pope_answer("Yes, there is a dog in the image.") == "yes"
    assert pope_answer("No") == "no"
    assert pope_answer("There is not a dog.") == "no"
    assert pope_answer("Yes. But no cat.") == "yes"  # only the first sentence counts
    assert pope_answer("no, there is none") == "no"  # comma deleted: "no" is a word
    assert pope_answer("NO") == "yes"  # the official rule is case-sensitive
    assert pope_answer("Nope") == "yes" and pope_answer("") == "yes"
    assert pope_answer("I don't know") == "yes"


def test_exact_parser():
    assert exact_answer(" Yes ") == "yes" and exact_answer("NO\n") == "no"
    assert exact_answer("Yes.") is None and exact_answer("No, there is not") is None


def test_pope_metrics_hand_computed_pope_parser():
    preds = ["Yes", "No.", "There is no cat", "yes there is", "Yes", "no"]
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    # parsed: yes no no yes yes no -> TP 2, FN 1, FP 1, TN 2
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 6)
    assert m["count"] == 6 and "unparsed" not in m


def test_pope_metrics_hand_computed_exact_parser():
    preds = ["Yes", "no", "Yes.", "maybe", "YES", "No"]
    labels = ["yes", "no", "yes", "no", "yes", "yes"]
    # parsed: yes no None None yes no -> correct 3; TP 2, predicted yes 2, labelled yes 4
    m = pope_metrics(preds, labels, parser="exact")
    assert m["unparsed"] == 2 and m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 0.5 / 1.5)
    # yes_ratio counts predictions (2 yes of 6), not labels (4 of 6)
    assert m["yes_ratio"] == pytest.approx(2 / 6)
    # all-no predictions: precision and F1 are 0, not NaN
    z = pope_metrics(["no"] * 3, ["yes", "no", "no"], parser="exact")
    assert z["precision"] == 0.0 and z["f1"] == 0.0 and z["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="label 1"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(ValueError, match="parser"):
        pope_metrics(["yes"], ["yes"], parser="other")


def test_pope_summary_mean_f1():
    a = pope_metrics(["yes", "no"], ["yes", "no"])
    b = pope_metrics(["yes", "yes"], ["yes", "no"])
    s = pope_summary({"random": a, "popular": b})
    assert s["mean_f1"] == pytest.approx((1.0 + 2 / 3) / 2) and s["random"] == a


def test_read_pope_questions_and_examples(tmp_path):
    from perpo_jax.data.pope import POPE_SUFFIX, pope_examples, read_pope_questions
    from perpo_jax.rewards import REWARDS, pope_rewards

    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "COCO_val2014_1.jpg")
    rows = [{"question_id": 1, "image": "COCO_val2014_1.jpg", "text": "Is there a dog in the image?",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_1.jpg", "text": "Is there a cat in the image?",
             "label": "no"}]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qs = read_pope_questions(str(path))
    ex = pope_examples(qs, str(tmp_path))
    assert [e.answer for e in ex] == ["yes", "no"]
    assert ex[0].question == f"Is there a dog in the image?\n{POPE_SUFFIX}"
    assert ex[0].image.shape == (10, 20, 3) and ex[0].image is ex[1].image  # decoded once
    np.testing.assert_array_equal(pope_rewards(["Yes.", "There is a cat"], ["yes", "no"]), [1, 0])
    assert REWARDS["pope"] is pope_rewards  # data.task=pope: registered like grounding / ocr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question_id": 3, "image": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.json:2: .*lacks \['text', 'label'\]"):
        read_pope_questions(str(bad))


def test_negative_strategies_on_hand_made_counts():
    from perpo_jax.data.shapes_pope import CATEGORIES, image_questions

    c = len(CATEGORIES)
    freq = np.zeros(c, np.int64)
    freq[[5, 7, 9]] = [10, 30, 20]  # most frequent: 7, 9, 5
    co = np.zeros((c, c), np.int64)
    co[0, [11, 12, 13, 14]] = [4, 1, 9, 2]  # with category 0: 13, 11, 14
    rng = np.random.default_rng(0)
    pop = image_questions([0, 7], "popular", rng, freq, co)
    assert pop == [(CATEGORIES[0], "yes"), (CATEGORIES[7], "yes"),
                   (CATEGORIES[9], "no"), (CATEGORIES[5], "no")]  # 7 is present: skipped
    adv = image_questions([0, 1, 2], "adversarial", rng, freq, co)
    assert [q for q in adv if q[1] == "no"] == [(CATEGORIES[k], "no") for k in (13, 11, 14)]
    rnd = image_questions([3], "random", rng, freq, co)
    assert len(rnd) == 2 and rnd[0] == (CATEGORIES[3], "yes") and rnd[1][0] != CATEGORIES[3]


def test_shapes_pope_builder(tmp_path):
    from perpo_jax.data import shapes_pope
    from perpo_jax.data.pope import POPE_SUFFIX
    from perpo_jax.data.examples import record_example, text_of

    builder = shapes_pope.build(str(tmp_path), num_train=3, num_val=4, image_size=32)
    splits = shapes_pope.pope_splits(builder)
    assert set(builder.as_data_source()) == {"train", "val", "popular", "adversarial"}
    for name, source in splits.items():
        answers = [text_of(source[i]["answer"]) for i in range(len(source))]
        assert answers.count("yes") == answers.count("no") > 0, name
        by_image = {}
        for i in range(len(source)):
            rec = source[i]
            by_image.setdefault(int(rec["image_index"]), []).append(rec)
        assert len(by_image) == 4
        for recs in by_image.values():  # same image, same present set, on every split
            ex = record_example(recs[0])
            assert ex.question.endswith(POPE_SUFFIX) and ex.question.startswith("Is there a ")
            yes = {text_of(r["category"]) for r in recs if text_of(r["answer"]) == "yes"}
            no = {text_of(r["category"]) for r in recs if text_of(r["answer"]) == "no"}
            assert yes and not yes & no
    # the val images are the same across the three strategies
    def first_image(source):
        return next(source[i]["image"] for i in range(len(source))
                    if int(source[i]["image_index"]) == 0)

    np.testing.assert_array_equal(first_image(splits["random"]), first_image(splits["adversarial"]))


def test_pope_entry_point_scores_every_split(shared, tmp_path):
    """`perpo-jax pope`: a (tiny, random) model answers the three official-format question
    files; per-split metrics, mean F1 and a report file."""
    from tiny_run import TINY_MODEL

    from perpo_jax import cli
    from perpo_jax.data import pope

    _, data = shared
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "COCO_val2014_7.jpg")
    for split in pope.POPE_SPLITS:
        rows = [{"question_id": i, "image": "COCO_val2014_7.jpg", "label": lab,
                 "text": f"Is there a {obj} in the image?"}
                for i, (obj, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "no")])]
        (tmp_path / f"coco_pope_{split}.json").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli.main([
        "pope", "--pope-dir", str(tmp_path), "--image-dir", str(tmp_path), "--limit", "2",
        "--out", str(tmp_path / "pope.json"), f"data.data_dir={data.data_dir}",
        "data.task=test_digits", "data.num_train=32", "data.num_val=8", "data.image_size=32",
        TINY_MODEL,
        "train.max_length=192", "eval.batch_size=2", "eval.max_new_tokens=3"]) == 0
    report = json.loads((tmp_path / "pope.json").read_text())
    assert set(report["splits"]) == set(pope.POPE_SPLITS)
    assert all(m["count"] == 2 for m in report["splits"].values())
    assert 0.0 <= report["mean_f1"] <= 1.0
    assert report["mean_f1"] == pytest.approx(
        sum(m["f1"] for m in report["splits"].values()) / 3)
    assert all(len(a) == 2 for a in report["answers"].values())
