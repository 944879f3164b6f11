"""Evaluation metrics on hand-made predictions, report and PNG outputs."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from perpo_jax.eval import grounding, ocr, report


def test_grounding_metrics_hand_computed():
    gt = np.array([[0, 0, 0.5, 0.5]] * 4, np.float32)
    texts = ["[0.00, 0.00, 0.50, 0.50]",  # IoU 1
             " [0.25, 0.00, 0.75, 0.50]",  # overlap 0.125 / union 0.375 = 1/3
             "I cannot tell",  # unreadable -> 0
             "[0.00, 0.00, 0.50, 0.40]"]  # 0.2 / 0.25 = 0.8
    m = grounding.grounding_metrics(texts, gt)
    assert m["acc@0.5"] == pytest.approx(0.5)
    assert m["mean_iou"] == pytest.approx((1 + 1 / 3 + 0 + 0.8) / 4, abs=1e-6)
    assert m["parse_rate"] == pytest.approx(0.75) and m["count"] == 4
    boxes = grounding.predicted_boxes(texts)
    assert np.isnan(boxes[2]).all()
    np.testing.assert_allclose(boxes[1], [0.25, 0, 0.75, 0.5])


def test_char_prf_hand_computed():
    # pred chars {a,b,c,c}, ref {a,b,c,d}: overlap a,b,c = 3; P = 3/4, R = 3/4
    assert ocr.char_precision_recall_f1("ab cc", "abcd") == pytest.approx((0.75, 0.75, 0.75))
    # pred "aab" vs ref "ab": overlap 2; P = 2/3, R = 1, F1 = 0.8
    assert ocr.char_precision_recall_f1("aab", "ab") == pytest.approx((2 / 3, 1.0, 0.8))
    assert ocr.char_precision_recall_f1("", "") == (1.0, 1.0, 1.0)
    assert ocr.char_precision_recall_f1("", "x") == (0.0, 0.0, 0.0)
    assert ocr.char_precision_recall_f1("xyz", "abc") == (0.0, 0.0, 0.0)


def test_bleu_hand_computed():
    assert ocr.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    # p1 = 5/6 ("the" clipped to 1); p2 = (3+1)/(5+1); p3 = (2+1)/(4+1); p4 = (1+1)/(3+1)
    want = (5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert ocr.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == \
        pytest.approx(want)
    # brevity: c = 2, r = 6 -> BP = exp(1 - 3); p1 = 1, p2 = 2/2, p3 = p4 = 1/1 (smoothed)
    assert ocr.corpus_bleu(["the cat"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-2))
    assert ocr.corpus_bleu(["dog"], ["the cat"]) == 0.0
    assert ocr.corpus_bleu([""], ["the cat"]) == 0.0
    # corpus-level: counts are summed before dividing (not an average of sentence BLEUs)
    hyps, refs = ["a b c d", "x y"], ["a b c d", "x z"]
    # p1 = 5/6, p2 = (3+1)/(4+1), p3 = (2+1)/(2+1), p4 = (1+1)/(1+1), BP = 1
    assert ocr.corpus_bleu(hyps, refs) == pytest.approx((5 / 6 * 4 / 5) ** 0.25)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        ocr.corpus_bleu(hyps, refs[:1])


def test_ocr_metrics_hand_computed():
    m = ocr.ocr_metrics(["hello", "wrld"], ["hello", "world"])
    # NED: 0 and 1/5 -> mean 0.1
    assert m["ned"] == pytest.approx(0.1, abs=1e-6)
    assert m["edit_similarity"] == pytest.approx(0.9, abs=1e-6)
    assert m["char_precision"] == pytest.approx(1.0)
    assert m["char_recall"] == pytest.approx((1 + 4 / 5) / 2)
    assert m["char_f1"] == pytest.approx((1 + 2 * 0.8 / 1.8) / 2)
    # unigrams 1/2 matched, no higher n-grams exist: BLEU = (1/2)^(1/4) (BP = 1)
    assert m["bleu"] == pytest.approx(0.5 ** 0.25) and m["count"] == 2


def test_write_report_json(tmp_path):
    path = tmp_path / "sub" / "report.json"
    report.write_report(str(path), {"grounding": {"acc@0.5": np.float32(0.5), "count": np.int64(3)},
                                "per_example": np.array([0.1, 0.2])})
    data = json.loads(path.read_text())
    assert data == {"grounding": {"acc@0.5": 0.5, "count": 3}, "per_example": [0.1, 0.2]}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left


def test_draw_boxes_png_pixels(tmp_path):
    grey = np.full((16, 16, 3), 128, np.uint8)
    gt = np.array([[0.25, 0.25, 0.75, 0.75], [0, 0, 1, 1]])
    preds = {"ours": np.array([[0.0, 0.0, 0.5, 0.125], [np.nan] * 4])}
    path = tmp_path / "boxes.png"
    report.draw_boxes_png(str(path), [grey, grey], gt, preds, ["a", "b"], tile=64, columns=2)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    legend = 20
    cell = img[legend:legend + 64, :64]  # first tile
    assert tuple(cell[32, 16]) == report.GT_COLOUR and tuple(cell[32, 47]) == report.GT_COLOUR
    assert tuple(cell[16, 32]) == report.GT_COLOUR and tuple(cell[47, 32]) == report.GT_COLOUR
    assert tuple(cell[32, 32]) == (128, 128, 128)  # inside is untouched
    ours_colour = report.METHOD_COLOURS[0]
    assert tuple(cell[4, 0]) == ours_colour and tuple(cell[7, 20]) == ours_colour
    second = img[legend:legend + 64, 68:132]
    ours = (second == np.array(report.METHOD_COLOURS[0])).all(-1)
    # NaN -> no box drawn; the tile says "ours: no box" in a label of its colour at the top
    assert ours[: report.LINE_HEIGHT + 3].any() and not ours[report.LINE_HEIGHT + 3:].any()
    assert tuple(second[32, 0]) == report.GT_COLOUR
