"""Benchmark-style (Fox / GOT-OCR2.0) OCR metrics against values computed by hand."""
import math

import pytest

from perpo_jax.eval import ocr
from perpo_jax.eval.ocr import (METEOR_MISSING, ocr_benchmark_metrics, ocr_page_metrics,
                                ocr_word_tokens)


class NoSynonyms:
    """A WordNet stand-in without synonyms: METEOR then matches exact and stemmed words only,
    so its value follows from the formula by hand."""

    def synsets(self, *args, **kwargs):
        return []


def test_tokens_split_on_whitespace_for_latin_text():
    assert ocr_word_tokens("a  b\nc", "x\ty") == (["a", "b", "c"], ["x", "y"])


def test_tokens_use_jieba_for_both_texts_when_either_has_chinese():
    pred, ref = ocr_word_tokens("hello world", "我爱北京天安门")
    assert ref == ["我", "爱", "北京", "天安门"]
    assert pred == ["hello", " ", "world"]  # jieba keeps the space: the benchmark's tokens


def test_edit_distance_is_character_levenshtein_over_the_longer_text():
    # "kitten" -> "sitting": 3 edits, longer text 7 characters
    assert ocr_page_metrics("kitten", "sitting", wordnet=NoSynonyms())["edit_distance"] == \
        pytest.approx(3 / 7)


def test_set_precision_recall_f1_in_both_orders():
    # prediction set {a, b, c, d}, ground-truth set {a, b, e}: overlap 2
    standard = ocr_page_metrics("a b c d a", "a b e", order="standard", wordnet=NoSynonyms())
    assert standard["precision"] == pytest.approx(2 / 4)
    assert standard["recall"] == pytest.approx(2 / 3)
    f1 = 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)
    assert standard["f1"] == pytest.approx(f1)
    # the published scripts pass the ground truth as the prediction: the two swap
    bench = ocr_page_metrics("a b c d a", "a b e", wordnet=NoSynonyms())
    assert (bench["precision"], bench["recall"]) == pytest.approx((2 / 3, 2 / 4))
    assert bench["f1"] == pytest.approx(f1)


def test_bleu_by_hand_with_brevity_penalty_in_both_orders():
    pred, gt = "a b c d e f", "a b c d e"
    # standard: hypothesis = prediction (6 words): p1..p4 = 5/6, 4/5, 3/4, 2/3; c > r: BP = 1
    standard = ocr_page_metrics(pred, gt, order="standard", wordnet=NoSynonyms())["bleu"]
    assert standard == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)
    # benchmark: hypothesis = ground truth (5 words), every n-gram matches; BP = e^(1 - 6/5)
    bench = ocr_page_metrics(pred, gt, wordnet=NoSynonyms())["bleu"]
    assert bench == pytest.approx(math.exp(1 - 6 / 5))


def test_meteor_by_hand_without_synonyms():
    # Fmean = P R / (0.9 P + 0.1 R); penalty = 0.5 (chunks / matches)^3; score = Fmean (1 - pen)
    same = ocr_page_metrics("a b c d", "a b c d", wordnet=NoSynonyms())["meteor"]
    assert same == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    swapped = ocr_page_metrics("c d a b", "a b c d", wordnet=NoSynonyms())["meteor"]
    assert swapped == pytest.approx(1 - 0.5 * (2 / 4) ** 3)
    # 2 of 3 ground-truth words predicted among 4 predicted words, one chunk; benchmark order:
    # reference = prediction (4 words), hypothesis = ground truth (3 words)
    p, r = 2 / 3, 2 / 4
    fmean = p * r / (0.9 * p + 0.1 * r)
    part = ocr_page_metrics("x a b y", "a b z", wordnet=NoSynonyms())["meteor"]
    assert part == pytest.approx(fmean * (1 - 0.5 * (1 / 2) ** 3))


def test_meteor_is_none_with_the_reason_when_wordnet_is_missing(monkeypatch):
    monkeypatch.setattr(ocr, "meteor_wordnet", lambda: None)
    page = ocr_page_metrics("a b", "a b")
    assert page["meteor"] is None and page["f1"] == 1.0
    table = ocr_benchmark_metrics(["a b"], ["a b"])
    assert table["meteor"] is None and table["meteor_unavailable"] == METEOR_MISSING


def test_table_averages_pages_and_keeps_char_extras():
    wn = NoSynonyms()
    texts, refs = ["a b c d a", "kitten", ""], ["a b e", "sitting", "x y"]
    table = ocr_benchmark_metrics(texts, refs, wordnet=wn)
    pages = [ocr_page_metrics(t, r, wordnet=wn) for t, r in zip(texts, refs)]
    for key in ("edit_distance", "f1", "precision", "recall", "bleu", "meteor"):
        assert table[key] == pytest.approx(sum(p[key] for p in pages) / 3)
    # an empty prediction: edit distance 1, every word metric 0
    assert pages[2]["edit_distance"] == 1.0
    assert pages[2]["f1"] == pages[2]["bleu"] == pages[2]["meteor"] == 0.0
    assert (table["count"], table["empty_predictions"], table["order"]) == (3, 1, "benchmark")
    assert {"char_precision", "char_recall", "char_f1", "corpus_bleu"} <= set(table)
    assert "meteor_unavailable" not in table


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="order"):
        ocr_page_metrics("a", "a", order="reversed")
    with pytest.raises(ValueError, match="references\\[1\\]"):
        ocr_benchmark_metrics(["a", "b"], ["a", "  "], wordnet=NoSynonyms())
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        ocr_benchmark_metrics(["a", "b"], ["a"])
