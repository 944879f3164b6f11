"""Dense-OCR reward: 1 - normalised Levenshtein distance on Unicode characters (pure numpy)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _code_points(text: str) -> np.ndarray:
    """``[L]`` uint32 code points of ``text`` (one per Python character, lone surrogates too)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, cost 1 each) between two strings.

    Row-vectorised DP: rows run over the shorter string, each row is a numpy vector over the
    longer one. Per row, substitution and deletion are elementwise; the insertion chain
    ``D[j] = min_k<=j (T[k] + j - k)`` is ``minimum.accumulate(T - arange) + arange``.
    A shared prefix and suffix never change the distance and are stripped first.
    O(len(a) * len(b)) work, O(len(a) + len(b)) memory.
    """
    x, y = _code_points(a), _code_points(b)
    if len(x) > len(y):
        x, y = y, x
    # Strip the common prefix and suffix.
    n = min(len(x), len(y))
    differ = np.flatnonzero(x[:n] != y[:n])
    start = differ[0] if len(differ) else n
    x, y = x[start:], y[start:]
    n = min(len(x), len(y))
    differ = np.flatnonzero(x[::-1][:n] != y[::-1][:n])
    stop = differ[0] if len(differ) else n
    x, y = x[:len(x) - stop], y[:len(y) - stop]
    if len(x) == 0:
        return int(len(y))

    cols = np.arange(len(y) + 1, dtype=np.int64)  # D[0, j] = j
    row = cols.copy()
    for i, ch in enumerate(x, start=1):
        t = np.empty_like(row)
        t[0] = i
        # substitution (or match) from the diagonal, deletion from above
        np.minimum(row[:-1] + (y != ch), row[1:] + 1, out=t[1:])
        row = np.minimum.accumulate(t - cols) + cols  # insertion chain along the row
    return int(row[-1])


def edit_similarity(pred: str, ref: str) -> float:
    """``1 - levenshtein / max(len(pred), len(ref))`` in [0, 1]; two empty strings give 1."""
    longest = max(len(pred), len(ref))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred, ref) / longest


def ocr_rewards(texts: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """OCR reward of each response: ``texts`` ``[N]`` vs ``references`` ``[N]`` -> ``[N]`` float32.

    Raises ValueError when the two sequences differ in length, TypeError naming the index when an
    element is not a str.
    """
    if len(texts) != len(references):
        raise ValueError(f"texts has {len(texts)} items but references has {len(references)}")
    out = np.empty(len(texts), np.float32)
    for n, (pred, ref) in enumerate(zip(texts, references)):
        if not isinstance(pred, str) or not isinstance(ref, str):
            raise TypeError(f"texts[{n}] and references[{n}] must be str, got "
                            f"{type(pred).__name__} and {type(ref).__name__}")
        out[n] = edit_similarity(pred, ref)
    return out
