"""Reward throughput on this machine; prints ONE JSON object (not a test).

    python bench/rewards.py [--num-texts 100000] [--page-chars 2000] [--pages 100] [--repeats 5]

- IoU rewards per second over ``num_texts`` grounding responses (parse + vectorised IoU);
- the OCR reward of ``pages`` page pairs of ``page-chars`` characters (a noisy read of each
  page: ~2% substitutions, insertions and deletions each, so no shared prefix/suffix shortcut),
  all in ONE ``ocr_rewards`` call as a round makes it, in ms per page pair; and, in the same
  run and interleaved with ours, rapidfuzz's C++ ``Levenshtein.distance`` over the same pairs
  (a bench-only comparison: ``pip install rapidfuzz``; never a dependency of perpo_jax — without
  it the JSON says "rapidfuzz not installed"). Distances are checked equal.
Best of ``repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ modules, however run

from perpo_jax.rewards import iou_rewards, ocr_rewards  # noqa: E402
from perpo_jax.rewards.ocr import levenshtein_batch  # noqa: E402
from timing import best_time, machine_info  # noqa: E402


def grounding_inputs(n: int, rng: np.random.Generator):
    lo = rng.uniform(0, 0.6, (n, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.01, 0.4, (n, 2))], axis=1)
    texts = [f"[{a:.2f}, {b:.2f}, {c:.2f}, {d:.2f}]" for a, b, c, d in boxes]
    for k in range(0, n, 10):  # some chatter and some garbage, as sampled answers have
        texts[k] = "The object is at " + texts[k] + "." if k % 20 else "I cannot find it."
    return texts, boxes + rng.normal(0, 0.03, boxes.shape)


def ocr_inputs(chars: int, rng: np.random.Generator):
    alphabet = list("abcdefghijklmnopqrstuvwxyz      ,.\nÄöüßéèàç日本語")
    page = rng.choice(alphabet, chars)
    noisy = []
    for ch in page:
        u = rng.random()
        if u < 0.02:
            continue  # deletion
        noisy.append(rng.choice(alphabet) if u < 0.04 else ch)
        if u > 0.98:
            noisy.append(rng.choice(alphabet))  # insertion
    noisy[0] = "#"
    noisy[-1] = "#"
    return "".join(noisy), "".join(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-texts", type=int, default=100_000)
    parser.add_argument("--page-chars", type=int, default=2_000)
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    texts, gt = grounding_inputs(args.num_texts, rng)
    iou_s = best_time(lambda: iou_rewards(texts, gt), args.repeats)
    pages = [ocr_inputs(args.page_chars, rng) for _ in range(args.pages)]
    preds, refs = [p for p, _ in pages], [r for _, r in pages]
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError:
        Levenshtein = None
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):  # interleaved: both sides see the same machine load
        start = time.perf_counter()
        ours = levenshtein_batch(preds, refs)
        ours_t.append(time.perf_counter() - start)
        if Levenshtein is not None:
            start = time.perf_counter()
            theirs = [Levenshtein.distance(p, r) for p, r in zip(preds, refs)]
            theirs_t.append(time.perf_counter() - start)
    reward_s = best_time(lambda: ocr_rewards(preds, refs), args.repeats)
    ocr = {
        "page_pairs": args.pages,
        "page_chars_mean": [round(float(np.mean([len(p) for p in preds]))),
                            round(float(np.mean([len(r) for r in refs])))],
        "mean_distance": float(np.mean(ours)),
        "ocr_rewards_ms_per_page_pair": round(reward_s / args.pages * 1e3, 4),
        "levenshtein_batch_ms_per_page_pair": round(min(ours_t) / args.pages * 1e3, 4),
    }
    if Levenshtein is None:
        ocr["rapidfuzz"] = "rapidfuzz not installed"
    else:
        ocr["rapidfuzz_ms_per_page_pair"] = round(min(theirs_t) / args.pages * 1e3, 4)
        ocr["ours_over_rapidfuzz"] = round(min(ours_t) / min(theirs_t), 2)
        ocr["identical_distances"] = bool(list(ours) == list(theirs))

    print(json.dumps({
        "iou_num_texts": args.num_texts,
        "iou_seconds": round(iou_s, 4),
        "iou_rewards_per_second": round(args.num_texts / iou_s),
        "ocr": ocr,
        "repeats": args.repeats,
        "machine": machine_info(),
    }))


if __name__ == "__main__":
    main()
