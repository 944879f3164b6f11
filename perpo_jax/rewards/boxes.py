"""Grounding reward: parse the first normalised box of a response, IoU against ground truth.

Boxes are ``[x1, y1, x2, y2]`` in [0, 1] (image width/height units), the format of the
LLaVA-1.5 grounding prompt (``"[0.12, 0.34, 0.56, 0.78]"``). Pure numpy: never imports jax.

Frames (``box_to_frame`` / ``box_from_frame``): a normalised box is relative either to the
original image (``"original"``: x / W, y / H) or to the square LLaVA-1.5 pads it to
(``"padded"``: LLaVA's ``expand2square`` pastes the W x H image at ((S - W) // 2, (S - H) // 2)
of an S = max(W, H) square, so x -> (x + (S - W) // 2) / S). Both are axis-aligned affine maps
of pixel coordinates with positive scale, so IoU is the same in either frame.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"\s*,\s*"
# Four comma-separated numbers, optionally inside [] or (), anywhere in the text. The
# look-arounds stop the match from starting or ending inside a longer number ("10.5" -> "0.5",
# "0.45e" is not "0.4"); a '.' after the last number ends it only when no digit follows, so a
# sentence-final period ("... 0.3, 0.4.") still reads as 0.4 while "0.4.5" does not.
_BOX_RE = re.compile(
    r"(?<![\d.])[\[(]?\s*(" + _NUMBER + ")" + _SEP + "(" + _NUMBER + ")" + _SEP
    + "(" + _NUMBER + ")" + _SEP + "(" + _NUMBER + r")(?!\d|\.\d|[eE])"
)
BOX_FRAMES = ("original", "padded")


def _read_box(text: str) -> tuple[float, float, float, float] | None:
    """First valid box of ``text`` as floats, or None (no box, empty/inverted, out of [0, 1])."""
    if not isinstance(text, str):
        return None
    match = _BOX_RE.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(g) for g in match.groups())  # huge exponents give inf, no error
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        return None
    if x1 >= x2 or y1 >= y2:
        return None
    return x1, y1, x2, y2


def parse_box(text: str) -> np.ndarray | None:
    """First box in ``text`` as float32 ``[4]`` = ``[x1, y1, x2, y2]``, or None.

    Tolerates spaces, brackets or parentheses and surrounding words
    (``"The glass is at (0.61, 0.1, 0.77, 0.54)."``). Returns None, never raises, when there is
    no box, a coordinate is NaN/inf or outside [0, 1], or the box is empty (x1 >= x2 or y1 >= y2).
    """
    box = _read_box(text)
    return None if box is None else np.asarray(box, np.float32)


def box_iou(pred_n4: np.ndarray, gt_n4: np.ndarray) -> np.ndarray:
    """Vectorised IoU of box pairs ``[N, 4]`` x ``[N, 4]`` -> ``[N]`` float64 in [0, 1].

    Pairs whose union has no area (degenerate ground truth and prediction) give 0.
    """
    ix1 = np.maximum(pred_n4[:, 0], gt_n4[:, 0])
    iy1 = np.maximum(pred_n4[:, 1], gt_n4[:, 1])
    ix2 = np.minimum(pred_n4[:, 2], gt_n4[:, 2])
    iy2 = np.minimum(pred_n4[:, 3], gt_n4[:, 3])
    inter = np.clip(ix2 - ix1, 0.0, None) * np.clip(iy2 - iy1, 0.0, None)

    def area(b):
        return np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)

    union = area(pred_n4) + area(gt_n4) - inter
    safe_union = np.where(union > 0, union, 1.0)
    return np.clip(np.where(union > 0, inter / safe_union, 0.0), 0.0, 1.0)


def iou_rewards(texts: Sequence[str], gt_boxes: np.ndarray) -> np.ndarray:
    """IoU reward of each response: ``texts`` ``[N]`` vs ``gt_boxes`` ``[N, 4]`` -> ``[N]`` float32.

    A response without a readable valid box (see ``parse_box``) gets 0. Ground-truth boxes use
    the same normalised ``[x1, y1, x2, y2]`` convention; a non-finite ground truth gives 0.
    """
    gt = np.asarray(gt_boxes, dtype=np.float64)
    if gt.ndim != 2 or gt.shape != (len(texts), 4):
        raise ValueError(f"gt_boxes must have shape [N, 4] with N = len(texts) = {len(texts)}, "
                         f"got {gt.shape}")
    boxes = [_read_box(t) for t in texts]
    found = np.array([b is not None for b in boxes], dtype=bool)
    pred = np.array([b if b is not None else (0.0, 0.0, 0.0, 0.0) for b in boxes],
                    dtype=np.float64).reshape(len(texts), 4)
    ok = found & np.isfinite(gt).all(axis=1)
    iou = box_iou(pred, np.where(np.isfinite(gt), gt, 0.0))
    return np.where(ok, iou, 0.0).astype(np.float32)


def _square_geometry(width: int, height: int) -> tuple[int, int, int]:
    """(S, left, top): side of LLaVA's padded square and where the image is pasted in it.

    Same integer offsets as LLaVA's ``expand2square`` (``paste(img, (0, (W - H) // 2))`` when
    W > H, ``((H - W) // 2, 0)`` when H > W) and transformers' ``LlavaImageProcessor`` padding.
    """
    if not (isinstance(width, (int, np.integer)) and isinstance(height, (int, np.integer))
            and width > 0 and height > 0):
        raise ValueError(f"image size must be positive integers, got {width}x{height}")
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def _frame_affine(width: int, height: int, frame: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale [4], shift [4]) with frame_box = original_box * scale + shift."""
    if frame not in BOX_FRAMES:
        raise ValueError(f"box frame must be one of {BOX_FRAMES}, got {frame!r}")
    if frame == "original":
        _square_geometry(width, height)  # same argument checks for both frames
        return np.ones(4), np.zeros(4)
    side, left, top = _square_geometry(width, height)
    scale = np.array([width, height, width, height], np.float64) / side
    shift = np.array([left, top, left, top], np.float64) / side
    return scale, shift


def box_to_frame(box_n4, width: int, height: int, frame: str) -> np.ndarray:
    """Original-normalised boxes ``[..., 4]`` -> ``frame``-normalised ``[..., 4]`` float64.

    ``width`` / ``height``: the original image size in pixels; ``frame``: "original" (identity)
    or "padded" (LLaVA's expand2square square, see the module docstring). IoU between two boxes
    of one image is unchanged by the conversion.
    """
    scale, shift = _frame_affine(width, height, frame)
    return np.asarray(box_n4, np.float64) * scale + shift


def box_from_frame(box_n4, width: int, height: int, frame: str) -> np.ndarray:
    """Inverse of ``box_to_frame``: ``frame``-normalised ``[..., 4]`` -> original-normalised."""
    scale, shift = _frame_affine(width, height, frame)
    return (np.asarray(box_n4, np.float64) - shift) / scale
