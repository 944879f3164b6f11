"""Comparing two models on the same examples: a paired bootstrap of the mean gain."""
from __future__ import annotations

import numpy as np


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
