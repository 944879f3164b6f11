"""Turn scored candidates into the preference lists PerPO trains on (pure numpy, host side).

Per prompt: remove exact duplicate responses (keep the first), drop lists that cannot teach a
ranking (fewer than two responses, best - worst reward below the margin, a non-finite
reward), sort by reward descending and optionally thin to ``max_size`` candidates.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DROP_REASONS = ("too_few", "margin", "nonfinite_reward")


@dataclasses.dataclass(frozen=True)
class CandidateList:
    """One kept list. ``index`` is its position in the input batch; ``responses`` ``[K]`` and
    ``rewards`` ``[K]`` float32 are sorted by reward, descending (ties keep input order)."""
    index: int
    responses: tuple[str, ...]
    rewards: np.ndarray


@dataclasses.dataclass(frozen=True)
class BuiltLists:
    """Result of ``build_lists``: the kept lists and what was removed, by reason."""
    lists: tuple[CandidateList, ...]
    dropped: dict[str, int]
    duplicates_removed: int

    def padded(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rewards ``[L, k]`` float32 (0 on padding) and mask ``[L, k]`` bool for the loss."""
        rewards = np.zeros((len(self.lists), k), np.float32)
        mask = np.zeros((len(self.lists), k), bool)
        for row, cand in enumerate(self.lists):
            if len(cand.rewards) > k:
                raise ValueError(f"list {cand.index} has {len(cand.rewards)} candidates, more than "
                                 f"k={k}; pass max_size={k} to build_lists")
            rewards[row, :len(cand.rewards)] = cand.rewards
            mask[row, :len(cand.rewards)] = True
        return rewards, mask


def spread_indices(n: int, size: int) -> np.ndarray:
    """``size`` distinct indices into a length-``n`` sorted list, evenly spaced, first and last
    always included (so the best and the worst candidate survive the thinning)."""
    if size >= n:
        return np.arange(n)
    # Spacing (n-1)/(size-1) >= 1, so rounding half up keeps the indices distinct.
    return np.floor(np.linspace(0.0, n - 1, size) + 0.5).astype(np.int64)


def _dedup(responses: Sequence[str], rewards: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Keep the first occurrence of each exact response string (and its reward)."""
    seen: set[str] = set()
    keep = []
    for k, text in enumerate(responses):
        if text not in seen:
            seen.add(text)
            keep.append(k)
    return [responses[k] for k in keep], rewards[keep]


def build_lists(responses: Sequence[Sequence[str]], rewards, *, min_margin: float,
                max_size: int | None = None) -> BuiltLists:
    """Filter, deduplicate, sort and thin B candidate lists.

    Args:
      responses: B lists of response strings (lists may have different lengths).
      rewards: B reward vectors matching ``responses`` (a sequence of ``[K_b]`` arrays or one
        ``[B, K]`` array).
      min_margin: a list is dropped when best - worst reward (after deduplication) is below
        this (paper: 0.8 grounding, 0.04 OCR).
      max_size: if set (>= 2), longer lists are thinned to ``max_size`` candidates evenly
        spread over the reward-sorted list, ALWAYS keeping the best and the worst: taking the
        top ``max_size`` instead would lose the worst answer and shrink the reward gap the
        list was kept for.

    Returns:
      ``BuiltLists`` with the kept lists (input order), ``dropped`` = counts per reason in
      ``DROP_REASONS`` and the number of duplicate responses removed from all lists.
    """
    if len(responses) != len(rewards):
        raise ValueError(f"responses has {len(responses)} lists but rewards has {len(rewards)}")
    if max_size is not None and max_size < 2:
        raise ValueError(f"max_size must be >= 2 (a list needs a pair), got {max_size}")
    kept: list[CandidateList] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    duplicates = 0
    for b, (texts, scores) in enumerate(zip(responses, rewards)):
        # float64 until the end: the margin test should not hinge on float32 rounding.
        scores = np.asarray(scores, np.float64).reshape(-1)
        if len(scores) != len(texts):
            raise ValueError(f"list {b}: {len(texts)} responses but {len(scores)} rewards")
        unique_texts, scores = _dedup(list(texts), scores)
        duplicates += len(texts) - len(unique_texts)
        texts = unique_texts
        kept_or_reason = _one_list(b, texts, scores, min_margin, max_size)
        if isinstance(kept_or_reason, str):
            dropped[kept_or_reason] += 1
        else:
            kept.append(kept_or_reason)
    return BuiltLists(tuple(kept), dropped, duplicates)


def _one_list(b: int, texts: list[str], scores: np.ndarray, min_margin: float,
              max_size: int | None) -> CandidateList | str:
    """The kept list, or the name of the reason it is dropped."""
    if len(texts) < 2:
        return "too_few"
    if not np.all(np.isfinite(scores)):
        return "nonfinite_reward"
    if scores.max() - scores.min() < min_margin:
        return "margin"
    order = np.argsort(-scores, kind="stable")
    if max_size is not None:
        order = order[spread_indices(len(order), max_size)]
    return CandidateList(b, tuple(texts[k] for k in order), scores[order].astype(np.float32))
