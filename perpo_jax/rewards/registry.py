"""Name -> discriminative reward function, so users plug in their own reward.

A reward function maps ``(texts: Sequence[str] [N], targets [N]) -> np.ndarray [N] float32``,
higher is better; ``targets`` is whatever ground truth the task carries (boxes ``[N, 4]``,
reference strings, ...). It runs on the host and must not import jax.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from perpo_jax.rewards.boxes import iou_rewards
from perpo_jax.rewards.ocr import ocr_rewards
from perpo_jax.rewards.pope import pope_rewards

RewardFn = Callable[[Sequence[str], Any], np.ndarray]

REWARDS: dict[str, RewardFn] = {
    "grounding": iou_rewards,
    "ocr": ocr_rewards,
    "pope": pope_rewards,
}


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> RewardFn:
    """Add ``fn`` to ``REWARDS`` under ``name``; returns ``fn`` (usable as a decorator body).

    Re-registering an existing name raises ValueError unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"reward {name!r}: {fn!r} is not callable")
    if name in REWARDS and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    REWARDS[name] = fn
    return fn


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; the error lists the known names (config key `reward`)."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}") from None
