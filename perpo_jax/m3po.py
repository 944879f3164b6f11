"""M3PO pair selection: model-guided hard negatives (M3P-Score), host-side numpy.

The idea is M3PO's (arXiv 2508.12458): among a policy's own sampled candidates, pair the best
answer with the wrong answer the policy is most CONFIDENT about. The paper's public text gives
no formulas; the ones below are this project's definition.

For one prompt with candidates k (unmasked), MAS_k ∈ [0, 1] (multimodal alignment score: the
task reward, a CLIP similarity, or a registered scorer) and m_k the mean token log-prob of
candidate k under the policy:

    C_k = exp(m_k) ∈ (0, 1]                                         confidence
    p   = argmax_k  MAS_k + lam · C_k                                preferred
    n   = argmax_k  alpha · C_k + (1 − alpha) · (1 − MAS_k)          hard negative
          over k ≠ p with MAS_k ≤ MAS_p − delta
    no qualifying k, or fewer than 2 candidates  →  no pair (valid False)

Exact ties go to the lowest index in both argmaxes. Baseline pairings over the same pools:
`random_pairs` (vanilla DPO: a uniformly random pair whose MAS differ by ≥ delta, the higher
one chosen) and `rm_pairs` (RM-DPO: best vs worst MAS, when they differ by ≥ delta).

This module is the selection only. In training (`m3po.pairs != none`) `train.rounds.
select_round_pairs` scores a round's sampled lists once more by the POLICY
(`train.step.build_policy_logps`: the prefix-shared `scoring.list_logprobs`, image + prompt once
per list), takes `m = summed log-prob / response length` (`mean_token_logps`), and cuts each
list down to its selected pair (`pair_arrays`: a K = 2 list, MAS as its rewards) before the
reference log-probs and the DPO updates. The MAS scorers (task reward, CLIP, registered ones)
are `perpo_jax.mas`.
"""

from __future__ import annotations

import numpy as np

PAIRINGS = ("m3p", "random", "rm")


# ----------------------------------------------------------------------------- selection


def _check(mas, mean_logp, mask):
    mas = np.asarray(mas, np.float64)
    mean_logp = np.asarray(mean_logp, np.float64)
    mask = np.asarray(mask, bool)
    if mas.ndim != 2 or mean_logp.shape != mas.shape or mask.shape != mas.shape:
        raise ValueError(f"mas {mas.shape}, mean_logp {mean_logp.shape} and mask {mask.shape} "
                         "must all be [N, K]")
    bad = mask & ~(np.isfinite(mas) & (mas >= 0.0) & (mas <= 1.0))
    if bad.any():
        n, k = np.argwhere(bad)[0]
        raise ValueError(f"mas[{n}, {k}] = {mas[n, k]!r}: an unmasked MAS must be in [0, 1]")
    if (mask & np.isnan(mean_logp)).any():
        n, k = np.argwhere(mask & np.isnan(mean_logp))[0]
        raise ValueError(f"mean_logp[{n}, {k}] is NaN")
    return mas, mean_logp, mask


def confidence(mean_logp) -> np.ndarray:
    """C = exp(mean token log-prob), in [0, 1] (a log-prob rounding above 0 counts as 1)."""
    return np.exp(np.minimum(np.asarray(mean_logp, np.float64), 0.0))


def m3p_select(mas, mean_logp, mask, *, alpha: float = 0.5, lam: float = 0.1,
               delta: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M3P-Score pair of each pool (module docstring).

    mas [N, K] in [0, 1]; mean_logp [N, K] mean token log-prob of each candidate under the
    policy; mask [N, K] bool (False: padding, its values are ignored).
    Returns chosen [N] int64, rejected [N] int64, valid [N] bool. Where valid is False,
    rejected is -1 and chosen is the preferred candidate (-1 when the pool is empty).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mas, mean_logp, mask = _check(mas, mean_logp, mask)
    conf = np.where(mask, confidence(np.where(mask, mean_logp, 0.0)), 0.0)
    n, k = mas.shape
    rows = np.arange(n)
    # np.argmax returns the first maximum: exact ties go to the lowest index
    pref_score = np.where(mask, mas + lam * conf, -np.inf)
    chosen = np.argmax(pref_score, axis=1) if k else np.zeros(n, np.int64)
    qualifies = (mask & (np.arange(k)[None, :] != chosen[:, None])
                 & (mas <= mas[rows, chosen][:, None] - delta))
    neg_score = np.where(qualifies, alpha * conf + (1.0 - alpha) * (1.0 - mas), -np.inf)
    rejected = np.argmax(neg_score, axis=1) if k else np.zeros(n, np.int64)
    valid = qualifies.any(axis=1) & (mask.sum(axis=1) >= 2)
    has_any = mask.any(axis=1)
    return (np.where(has_any, chosen, -1).astype(np.int64),
            np.where(valid, rejected, -1).astype(np.int64), valid)


def rm_pairs(mas, mask, *, delta: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RM-DPO: best vs worst MAS of each pool (first index on ties); valid when the pool has
    two candidates and best − worst ≥ delta. Same return convention as `m3p_select`."""
    mas, _, mask = _check(mas, np.zeros(np.shape(mas)), mask)
    best = np.argmax(np.where(mask, mas, -np.inf), axis=1)
    worst = np.argmin(np.where(mask, mas, np.inf), axis=1)
    rows = np.arange(mas.shape[0])
    valid = (mask.sum(axis=1) >= 2) & (mas[rows, worst] <= mas[rows, best] - delta)
    return (np.where(mask.any(axis=1), best, -1).astype(np.int64),
            np.where(valid, worst, -1).astype(np.int64), valid)


def random_pairs(mas, mask, *, delta: float = 0.3, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vanilla DPO: a uniformly random pair (i, j) of each pool with MAS_j ≤ MAS_i − delta,
    i chosen. Same return convention as `m3p_select`."""
    mas, _, mask = _check(mas, np.zeros(np.shape(mas)), mask)
    n = mas.shape[0]
    chosen, rejected, valid = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool)
    for b in range(n):
        ok = (mask[b][:, None] & mask[b][None, :]
              & (mas[b][None, :] <= mas[b][:, None] - delta))
        np.fill_diagonal(ok, False)
        pairs = np.argwhere(ok)
        if len(pairs):
            i, j = pairs[rng.integers(len(pairs))]
            chosen[b], rejected[b], valid[b] = i, j, True
    return chosen, rejected, valid


def select_pairs(pairing: str, mas, mean_logp, mask, *, alpha: float, lam: float, delta: float,
                 rng: np.random.Generator | None = None):
    """The pair of each pool under `pairing` ("m3p" | "random" | "rm")."""
    if pairing == "m3p":
        return m3p_select(mas, mean_logp, mask, alpha=alpha, lam=lam, delta=delta)
    if pairing == "rm":
        return rm_pairs(mas, mask, delta=delta)
    if pairing == "random":
        return random_pairs(mas, mask, delta=delta, rng=rng or np.random.default_rng(0))
    raise ValueError(f"m3po.pairs must be one of {PAIRINGS}, got {pairing!r}")


def mean_token_logps(summed, response_mask) -> np.ndarray:
    """[N, K] summed response log-probs / response lengths (0 where a candidate is empty)."""
    lengths = np.asarray(response_mask, bool).sum(axis=-1)
    summed = np.asarray(summed, np.float64)
    return np.where(lengths > 0, summed / np.maximum(lengths, 1), 0.0)


# ----------------------------------------------------------------------------- lists → pairs


def pair_arrays(arrays: dict[str, np.ndarray], chosen, rejected, valid, mas
                ) -> dict[str, np.ndarray]:
    """A ListSet's arrays ([L, K, ...]) cut to the valid lists' pairs: K = 2 lists
    (chosen first), rewards = [MAS_chosen, MAS_rejected], list_mask all True."""
    keep = np.flatnonzero(valid)
    idx = np.stack([chosen[keep], rejected[keep]], axis=1)  # [L', 2]
    out = {}
    for name, arr in arrays.items():
        rows = arr[keep]
        if name in ("response_ids", "response_mask"):
            rows = np.take_along_axis(rows, idx[:, :, None], axis=1)
        elif name in ("rewards", "list_mask", "ref_logps"):
            rows = np.take_along_axis(rows, idx, axis=1)
        out[name] = rows
    out["rewards"] = np.take_along_axis(np.asarray(mas, np.float32)[keep], idx, axis=1)
    out["list_mask"] = np.ones(idx.shape, bool)
    out.pop("ref_logps", None)
    return out
