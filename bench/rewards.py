"""Reward throughput on this machine; prints ONE JSON object (not a test).

    python bench/rewards.py [--num-texts 100000] [--page-chars 2000] [--repeats 5]

- IoU rewards per second over ``num_texts`` grounding responses (parse + vectorised IoU);
- seconds for the OCR reward of one ``page-chars``-character page pair (a noisy read of the
  page: ~5% substitutions, insertions and deletions, so no shared prefix/suffix shortcut).
Best of ``repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from perpo_jax.rewards import iou_rewards, ocr_rewards  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    texts, gt = grounding_inputs(args.num_texts, rng)
    iou_s = best_time(lambda: iou_rewards(texts, gt), args.repeats)
    pred, ref = ocr_inputs(args.page_chars, rng)
    ocr_s = best_time(lambda: ocr_rewards([pred], [ref]), args.repeats)

    print(json.dumps({
        "iou_num_texts": args.num_texts,
        "iou_seconds": round(iou_s, 4),
        "iou_rewards_per_second": round(args.num_texts / iou_s),
        "ocr_page_chars": [len(pred), len(ref)],
        "ocr_reward": float(ocr_rewards([pred], [ref])[0]),
        "ocr_seconds_per_page_pair": round(ocr_s, 4),
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "numpy": np.__version__,
        },
    }))


if __name__ == "__main__":
    main()
