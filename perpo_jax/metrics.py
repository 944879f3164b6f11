"""Evaluation metrics on decoded predictions, JSON reports and box-drawing PNGs.

Metrics take predicted TEXTS and ground truth, so any decoder (greedy sampling, an HF model,
saved predictions) can feed them:

- `grounding_metrics(texts, gt_boxes)`: Acc@0.5 (IoU >= 0.5) and mean IoU, with boxes read
  by `perpo_jax.rewards.parse_box` (an unreadable answer scores IoU 0).
- `ocr_metrics(texts, references)`: mean normalised edit distance (NED = 1 - the OCR reward),
  character precision / recall / F1 and corpus BLEU-4 (`corpus_bleu`).
- `ocr_benchmark_metrics(texts, references)`: the dense-OCR table of Fox / GOT-OCR2.0 (and
  the PerPO paper): per-page normalised edit distance, word F1 / precision / recall, BLEU and
  METEOR (nltk; METEOR is None, with the reason, when nltk's WordNet data is not installed),
  averaged over pages, with the character-level ones above as extras.
- `pope_metrics(predictions, labels, parser="pope")`: POPE yes/no hallucination metrics
  (accuracy, precision, recall, F1, yes_ratio; "yes" is the positive class), with the
  official POPE answer parser or lmms-eval's exact match; `pope_summary` adds the mean F1
  over splits (how LLaVA-1.5 reports POPE).
- `paired_bootstrap_gain(base_scores, method_scores)`: mean per-example gain of one model
  over another on the same examples, with a paired bootstrap 95 % interval.
- `write_report(path, metrics)`: JSON, written atomically.
- `draw_boxes_png(path, images, gt_boxes, pred_boxes_by_method, captions)`: a grid of images
  with the ground-truth box in black and each method's predicted box in its own colour.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import math
import re
import warnings
from typing import Callable, Mapping, Sequence

import jieba
import numpy as np
from nltk.metrics import f_measure
from nltk.metrics import precision as set_precision
from nltk.metrics import recall as set_recall
from nltk.translate.bleu_score import sentence_bleu
from nltk.translate.meteor_score import meteor_score
from PIL import Image, ImageDraw, ImageFont

from perpo_jax.atomic import atomic_file
from perpo_jax.rewards import iou_rewards, ocr_rewards, parse_box
from perpo_jax.rewards.ocr import levenshtein_batch

# jieba prints its dictionary-loading progress to stderr at DEBUG level on first use
jieba.setLogLevel(logging.WARNING)

# ----------------------------------------------------------------------------- grounding


def grounding_metrics(texts: Sequence[str], gt_boxes: np.ndarray,
                      threshold: float = 0.5) -> dict[str, float]:
    """texts [N], gt_boxes [N, 4] normalised -> {"acc@0.5", "mean_iou", "parse_rate", "count"}.

    `acc@0.5` is the fraction with IoU >= threshold (the key names the threshold used).
    """
    if len(texts) == 0:
        raise ValueError("grounding_metrics needs at least one prediction")
    iou = iou_rewards(list(texts), np.asarray(gt_boxes, np.float32)).astype(np.float64)
    parsed = np.array([parse_box(t) is not None for t in texts])
    return {f"acc@{threshold:g}": float((iou >= threshold).mean()), "mean_iou": float(iou.mean()),
            "parse_rate": float(parsed.mean()), "count": len(texts)}


def predicted_boxes(texts: Sequence[str]) -> np.ndarray:
    """[N, 4] float32 boxes parsed from texts; rows of NaN where no box could be read."""
    out = np.full((len(texts), 4), np.nan, np.float32)
    for i, text in enumerate(texts):
        box = parse_box(text)
        if box is not None:
            out[i] = box
    return out


# ----------------------------------------------------------------------------- OCR


def char_precision_recall_f1(pred: str, ref: str) -> tuple[float, float, float]:
    """Character multiset overlap, whitespace ignored (layout is NED's business).

    overlap = sum_c min(count_pred(c), count_ref(c)); precision = overlap / |pred|,
    recall = overlap / |ref|; an empty side counts as perfect only if both are empty.
    """
    p_chars = collections.Counter(c for c in pred if not c.isspace())
    r_chars = collections.Counter(c for c in ref if not c.isspace())
    n_pred, n_ref = sum(p_chars.values()), sum(r_chars.values())
    if n_pred == 0 or n_ref == 0:
        same = float(n_pred == n_ref)
        return same, same, same
    overlap = sum((p_chars & r_chars).values())
    precision, recall = overlap / n_pred, overlap / n_ref
    f1 = 0.0 if overlap == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4,
                tokenize: Callable[[str], list[str]] = str.split) -> float:
    """Corpus BLEU (Papineni et al. 2002), one reference per hypothesis, in [0, 1].

    p_n = (clipped n-gram matches summed over the corpus) / (hypothesis n-grams summed);
    BP = exp(1 - r/c) when the total hypothesis length c < total reference length r, else 1;
    BLEU = BP * exp(mean_n log p_n), n = 1..max_n.
    Smoothing (Lin & Och 2004; Chen & Cherry 2014 "method 2"): for n >= 2,
    p_n = (matches + 1) / (total + 1), so a short hypothesis with no 4-gram match is not
    zeroed; unigram precision is unsmoothed, and no unigram match (or c = 0) gives 0.
    Tokens: whitespace-separated words by default.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = np.zeros(max_n), np.zeros(max_n)
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = tokenize(hyp), tokenize(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            h_grams = _ngrams(h, n)
            matches[n - 1] += sum((h_grams & _ngrams(r, n)).values())
            totals[n - 1] += sum(h_grams.values())
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    precisions = [matches[0] / totals[0]] + [
        (matches[n] + 1) / (totals[n] + 1) for n in range(1, max_n)]
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return float(brevity * math.exp(sum(math.log(p) for p in precisions) / max_n))


def ocr_metrics(texts: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """texts [N] vs references [N] -> mean NED, edit similarity, char P/R/F1 (macro means over
    examples), corpus BLEU-4 and count."""
    if len(texts) == 0:
        raise ValueError("ocr_metrics needs at least one prediction")
    similarity = ocr_rewards(list(texts), list(references)).astype(np.float64)
    prf = np.array([char_precision_recall_f1(p, r) for p, r in zip(texts, references)])
    return {"ned": float(1.0 - similarity.mean()), "edit_similarity": float(similarity.mean()),
            "char_precision": float(prf[:, 0].mean()), "char_recall": float(prf[:, 1].mean()),
            "char_f1": float(prf[:, 2].mean()), "bleu": corpus_bleu(texts, references),
            "count": len(texts)}


# ----------------------------------------------------------------------------- OCR, benchmark style
#
# What Fox (ucaslcl/Fox eval_tools/eval_ocr_test.py) and GOT-OCR2.0
# (GOT/eval/pyevaltools/eval_ocr.py, `nougat_per_metrics`) compute for one page, and the
# PerPO paper's dense-OCR table reports (means over pages):
#   tokens: jieba.lcut(text) for BOTH texts when either contains a CJK character
#           [\u4e00-\u9fa5], else str.split()
#   bleu:   nltk.translate.bleu([reference], hypothesis)  (sentence BLEU-4, no smoothing)
#   meteor: nltk meteor_score([reference], hypothesis)   (needs nltk's WordNet data)
#   f_measure / precision / recall: nltk.metrics over the token SETS
#   edit_dist: nltk.edit_distance(pred, gt) / max(len(pred), len(gt)), over characters
# Both scripts call `metrics(ann["label"], ann["answer"])` on a function whose parameters are
# (pred, gt): the ground truth is passed as the prediction. So in the published numbers
# "precision" is |P ∩ G| / |G| (recall in the usual sense), "recall" is |P ∩ G| / |P|, and
# BLEU / METEOR treat the model output as the reference. order="benchmark" reproduces that;
# order="standard" puts the ground truth in the reference role. F1 and the edit distance are
# the same either way.

OCR_ORDERS = ("benchmark", "standard")
_CJK = re.compile(r"[\u4e00-\u9fa5]")
METEOR_MISSING = ("nltk's WordNet corpus is not installed (METEOR's synonym stage needs it; "
                  "nltk.download cannot run offline): put the 'wordnet' corpus under a "
                  "directory on nltk.data.path (e.g. $NLTK_DATA/corpora/wordnet)")


def ocr_word_tokens(prediction: str, reference: str) -> tuple[list[str], list[str]]:
    """(prediction tokens, reference tokens) as the Fox / GOT scripts split them: jieba's
    default cut for both when either text contains a CJK character (jieba keeps the spaces
    between Latin words as tokens), whitespace split otherwise."""
    if _CJK.search(prediction) or _CJK.search(reference):
        return jieba.lcut(prediction), jieba.lcut(reference)
    return prediction.split(), reference.split()


@functools.cache
def meteor_wordnet():
    """nltk's WordNet reader when its data is installed, else None (nothing is downloaded)."""
    from nltk.corpus import wordnet  # a lazy loader: nothing is read until ensure_loaded

    try:
        wordnet.ensure_loaded()
    except LookupError:
        return None
    return wordnet


def _set_scores(reference: list[str], hypothesis: list[str]) -> tuple[float, float, float]:
    """nltk's (f_measure, precision, recall) over token sets; 0 where nltk gives None."""
    ref, hyp = set(reference), set(hypothesis)
    values = (f_measure(ref, hyp), set_precision(ref, hyp), set_recall(ref, hyp))
    return tuple(0.0 if v is None else float(v) for v in values)


def _sentence_bleu(reference: list[str], hypothesis: list[str]) -> float:
    # nltk warns once per page whose hypothesis has no n-gram match of some order (the score
    # is then ~0, as the benchmark reports it); pages are scored by the thousand
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(sentence_bleu([reference], hypothesis))


def _word_scores(pred_tokens: list[str], gt_tokens: list[str], order: str,
                 wordnet) -> dict[str, float | None]:
    """f1 / precision / recall / bleu / meteor of one page from its tokens."""
    if not pred_tokens:  # nothing predicted: no overlap (nltk would give None / divide by 0)
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "bleu": 0.0,
                "meteor": None if wordnet is None else 0.0}
    reference, hypothesis = ((pred_tokens, gt_tokens) if order == "benchmark"
                             else (gt_tokens, pred_tokens))
    f1, precision, recall = _set_scores(reference, hypothesis)
    meteor = None if wordnet is None else float(
        meteor_score([reference], hypothesis, wordnet=wordnet))
    return {"f1": f1, "precision": precision, "recall": recall,
            "bleu": _sentence_bleu(reference, hypothesis), "meteor": meteor}


def _checked_order(order: str) -> str:
    if order not in OCR_ORDERS:
        raise ValueError(f"order must be one of {OCR_ORDERS}, got {order!r}")
    return order


def ocr_page_metrics(prediction: str, reference: str, *, order: str = "benchmark",
                     wordnet=None) -> dict[str, float | None]:
    """One page's benchmark-style OCR metrics (see the section comment above).

    -> {"edit_distance": character Levenshtein / max(len) in [0, 1] (lower is better),
        "f1", "precision", "recall": token-set overlap in [0, 1], "bleu": sentence BLEU-4,
        "meteor": METEOR or None when no WordNet is available}.
    wordnet: a WordNet reader for METEOR (nltk's `WordNetCorpusReader` API: `synsets`);
    None = nltk's installed corpus (`meteor_wordnet()`). A prediction with no tokens scores 0
    on every word metric. The reference must hold at least one token.
    """
    order = _checked_order(order)
    pred_tokens, gt_tokens = ocr_word_tokens(prediction, reference)
    if not gt_tokens:
        raise ValueError("the reference text holds no token")
    longest = max(len(prediction), len(reference))
    distance = float(levenshtein_batch([prediction], [reference])[0]) / longest
    wordnet = meteor_wordnet() if wordnet is None else wordnet
    return {"edit_distance": distance, **_word_scores(pred_tokens, gt_tokens, order, wordnet)}


def ocr_benchmark_metrics(texts: Sequence[str], references: Sequence[str], *,
                          order: str = "benchmark", wordnet=None) -> dict:
    """The dense-OCR table: `ocr_page_metrics` averaged over pages (texts [N] vs references
    [N]), plus count, empty_predictions, and character-level extras (`ocr_metrics`:
    char_precision / char_recall / char_f1, and its smoothed corpus BLEU-4 as corpus_bleu).

    "meteor" is None when no WordNet is available, and "meteor_unavailable" then says why.
    """
    order = _checked_order(order)
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} predictions but {len(references)} references")
    if not len(texts):
        raise ValueError("ocr_benchmark_metrics needs at least one prediction")
    wordnet = meteor_wordnet() if wordnet is None else wordnet
    tokens = [ocr_word_tokens(p, r) for p, r in zip(texts, references)]
    for i, (_, gt_tokens) in enumerate(tokens):
        if not gt_tokens:
            raise ValueError(f"references[{i}] holds no token")
    longest = np.array([max(len(p), len(r)) for p, r in zip(texts, references)], np.float64)
    distance = levenshtein_batch(list(texts), list(references)) / longest  # one batched pass
    pages = [_word_scores(p, g, order, wordnet) for p, g in tokens]
    out: dict = {"edit_distance": float(distance.mean())}
    for key in ("f1", "precision", "recall", "bleu", "meteor"):
        values = [page[key] for page in pages]
        out[key] = None if values[0] is None else float(np.mean(values))
    if out["meteor"] is None:
        out["meteor_unavailable"] = METEOR_MISSING
    chars = ocr_metrics(texts, references)
    out.update({"count": len(texts), "empty_predictions": sum(not p for p, _ in tokens),
                "order": order, "char_precision": chars["char_precision"],
                "char_recall": chars["char_recall"], "char_f1": chars["char_f1"],
                "corpus_bleu": chars["bleu"]})
    return out


# ----------------------------------------------------------------------------- POPE

POPE_PARSERS = ("pope", "exact")


def pope_answer(text: str) -> str:
    """The official POPE rule (RUCAIBox/POPE evaluate.py): keep the text before the first
    '.', delete commas, split on spaces; "no" if one of the words is `No`, `not` or `no`,
    else "yes"."""
    words = str(text).split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def exact_answer(text: str) -> str | None:
    """lmms-eval's rule: lower-cased and stripped, the answer must be exactly "yes" or "no";
    None otherwise (counted wrong, reported as unparsed)."""
    text = str(text).strip().lower()
    return text if text in ("yes", "no") else None


def _label(value, i: int) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE label {i} is {value!r}; labels must be 'yes' or 'no'")
    return label


def pope_metrics(predictions: Sequence[str], labels: Sequence[str],
                 parser: str = "pope") -> dict[str, float]:
    """POPE metrics of predicted answer texts [N] against labels [N] ("yes" / "no").

    parser="pope": `pope_answer` (every text becomes yes or no); parser="exact":
    `exact_answer`, where anything but yes/no is wrong and counted in `unparsed`.
    "yes" is the positive class: precision = TP / predicted yes, recall = TP / labelled yes
    (an unparsed answer to a yes question is a miss), F1 their harmonic mean (0 when both 0),
    accuracy = correct / N, yes_ratio = predicted yes / N (of the PREDICTIONS, not the labels).
    """
    if parser not in POPE_PARSERS:
        raise ValueError(f"parser must be one of {POPE_PARSERS}, got {parser!r}")
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not len(labels):
        raise ValueError("pope_metrics needs at least one prediction")
    gold = [_label(v, i) for i, v in enumerate(labels)]
    parse = pope_answer if parser == "pope" else exact_answer
    pred = [parse(t) for t in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    pred_yes = sum(p == "yes" for p in pred)
    gold_yes = sum(g == "yes" for g in gold)
    correct = sum(p == g for p, g in zip(pred, gold))
    precision = tp / pred_yes if pred_yes else 0.0
    recall = tp / gold_yes if gold_yes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {"accuracy": correct / len(gold), "precision": precision, "recall": recall, "f1": f1,
           "yes_ratio": pred_yes / len(gold), "count": len(gold)}
    if parser == "exact":
        out["unparsed"] = sum(p is None for p in pred)
    return out


def pope_summary(by_split: Mapping[str, Mapping[str, float]]) -> dict:
    """{split: metrics} -> the same plus "mean_f1" (and "mean_accuracy") over the splits."""
    splits = dict(by_split)
    if not splits:
        raise ValueError("pope_summary needs at least one split")
    return {**splits, "mean_f1": float(np.mean([m["f1"] for m in splits.values()])),
            "mean_accuracy": float(np.mean([m["accuracy"] for m in splits.values()]))}


# ----------------------------------------------------------------------------- comparisons


def paired_bootstrap_gain(base_scores, method_scores, *, samples: int = 2000,
                          seed: int = 0) -> dict[str, float]:
    """Mean gain of a method over a base on the SAME examples, with a 95 % bootstrap interval.

    base_scores, method_scores: [N] per-example scores (e.g. 0/1 hits for Acc@0.5, IoUs).
    The examples are resampled with replacement `samples` times (paired: one index draw serves
    both models, so the interval reflects the per-example differences, not each model's
    spread); lo / hi are the 2.5th / 97.5th percentiles of the resampled mean gains.
    Returns {"mean", "lo", "hi", "n", "samples"}; deterministic for a given `seed`.
    """
    base = np.asarray(base_scores, np.float64).reshape(-1)
    method = np.asarray(method_scores, np.float64).reshape(-1)
    if base.shape != method.shape or base.size == 0:
        raise ValueError(f"paired_bootstrap_gain needs two equal, non-empty score vectors, got "
                         f"{base.shape} and {method.shape}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    diff = method - base
    index = np.random.default_rng(seed).integers(0, diff.size, size=(samples, diff.size))
    gains = diff[index].mean(axis=1)
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi), "n": int(diff.size),
            "samples": int(samples)}


# ----------------------------------------------------------------------------- outputs


def _plain(value):
    """numpy scalars/arrays -> JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file next to `path`, then rename it onto `path`."""
    with atomic_file(path) as tmp:
        write(tmp)


def write_report(path: str, metrics: Mapping) -> None:
    """Write `metrics` (nested dicts of numbers/strings, numpy allowed) as indented JSON."""
    text = json.dumps(_plain(metrics), indent=2, sort_keys=True, allow_nan=True) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


# Box colours no shapes-scene object has (red, green, blue, yellow, purple, orange on light grey)
GT_COLOUR = (0, 0, 0)
METHOD_COLOURS = ((0, 200, 230), (255, 0, 220), (120, 70, 20), (0, 120, 110), (120, 120, 255))
# Each box is a band centred on its edge, this many pixels wide per box drawn after it: the
# ground truth widest, each later box narrower on top, so where boxes agree all colours show
BOX_BAND = 3


CAPTION_LINES, LINE_HEIGHT = 2, 14


def _wrap(caption: str, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    """Greedy word wrap to `width` pixels, at most CAPTION_LINES lines ("…" if cut)."""
    lines, current = [], ""
    for word in caption.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    lines.append(current)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] += " …"
    return "\n".join(lines)


def _tile(image, gt_box, preds, caption: str, tile: int, font) -> Image.Image:
    """One grid cell: the image scaled to tile x tile, boxes drawn (ground truth widest,
    each later one `BOX_BAND` px narrower on top), "<method>: no box" for a prediction with
    no readable box, caption below. preds: [(box [4], colour, method name)]."""
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB").resize(
        (tile, tile), Image.NEAREST)
    cell = Image.new("RGB", (tile, tile + CAPTION_LINES * LINE_HEIGHT + 4), (255, 255, 255))
    cell.paste(img, (0, 0))
    draw = ImageDraw.Draw(cell)
    boxes = [(gt_box, GT_COLOUR, None)] + list(preds)
    unread = []
    for k, (box, colour, name) in enumerate(boxes):
        box = np.asarray(box, np.float64)
        if not np.isfinite(box).all():
            unread.append((name, colour))  # no readable prediction for this image
            continue
        x1, y1, x2, y2 = np.clip(box, 0, 1) * tile
        width = BOX_BAND * (len(boxes) - k)
        pad = width // 2  # the band is centred on the box edge: it hides less of the object
        draw.rectangle([x1 - pad, y1 - pad, max(x2 - 1, x1) + pad, max(y2 - 1, y1) + pad],
                       outline=colour, width=width)
    for row, (name, colour) in enumerate(unread):
        text = f"{name}: no box"
        y = 2 + row * (LINE_HEIGHT + 2)
        draw.rectangle([1, y - 1, 6 + draw.textlength(text, font=font), y + LINE_HEIGHT],
                       fill=(255, 255, 255), outline=colour, width=2)
        draw.text((4, y), text, fill=(0, 0, 0), font=font)
    draw.multiline_text((2, tile + 2), _wrap(caption, tile - 4, draw, font), fill=(0, 0, 0),
                        font=font, spacing=2)
    return cell


def draw_boxes_png(path: str, images: Sequence, gt_boxes: np.ndarray,
                   pred_boxes_by_method: Mapping[str, np.ndarray], captions: Sequence[str],
                   tile: int = 192, columns: int = 4) -> None:
    """Grid PNG: each image with its GT box (black) and every method's box (own colour, none
    of them a shapes-scene colour), in bands that stay visible where boxes agree.

    images: N HWC uint8 arrays/PIL images; gt_boxes [N, 4]; pred_boxes_by_method:
    name -> [N, 4] normalised (NaN rows = nothing predicted: the tile says "<name>: no box");
    captions [N]. A legend line on top maps colours to "ground truth" and the method names.
    """
    if len(pred_boxes_by_method) > len(METHOD_COLOURS):
        raise ValueError(f"at most {len(METHOD_COLOURS)} methods can be drawn")
    n = len(images)
    colours = dict(zip(pred_boxes_by_method, METHOD_COLOURS))
    font = ImageFont.load_default(size=12)
    rows, cols = -(-n // columns), min(columns, n)
    legend_h, cell_h = 20, tile + CAPTION_LINES * LINE_HEIGHT + 4
    canvas = Image.new("RGB", (cols * tile + (cols - 1) * 4, legend_h + rows * (cell_h + 4)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 2
    for name, colour in [("ground truth", GT_COLOUR)] + list(colours.items()):
        draw.rectangle([x, 4, x + 10, 14], fill=colour)
        draw.text((x + 14, 3), name, fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(name, font=font))
    for i in range(n):
        preds = [(np.asarray(boxes)[i], colours[m], m) for m, boxes in pred_boxes_by_method.items()]
        cell = _tile(images[i], gt_boxes[i], preds, captions[i], tile, font)
        canvas.paste(cell, ((i % columns) * (tile + 4), legend_h + (i // columns) * (cell_h + 4)))
    _atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
