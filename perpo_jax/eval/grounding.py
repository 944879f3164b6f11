"""Grounding metrics on decoded predictions: Acc@0.5 and mean IoU.

    grounding_metrics(texts, gt_boxes)   # texts [N], gt_boxes [N, 4] normalised
    predicted_boxes(texts)               # [N, 4], NaN rows where no box could be read

Boxes are read by `perpo_jax.rewards.parse_box` (an unreadable answer scores IoU 0).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from perpo_jax.rewards import iou_rewards, parse_box


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
