"""POPE reward: 1 when the official POPE answer parser reads a response as its yes/no label.

The parser (`pope_answer`) is the one RUCAIBox/POPE's evaluate.py applies; it lives here so the
reward and `perpo_jax.eval.pope`'s metrics read answers the same way. Pure Python + numpy.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pope_answer(text: str) -> str:
    """The official POPE rule (RUCAIBox/POPE evaluate.py): keep the text before the first
    '.', delete commas, split on spaces; "no" if one of the words is `No`, `not` or `no`,
    else "yes"."""
    words = str(text).split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def pope_rewards(texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """[N] float32: 1 where the POPE parser reads text i as labels[i] ("yes" / "no")."""
    return np.asarray([float(pope_answer(t) == str(g).strip().lower())
                       for t, g in zip(texts, labels)], np.float32)
