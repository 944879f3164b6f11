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

In training (`train.loop` with `m3po.pairs != none`) a round's sampled lists are scored once
more by the POLICY through the prefix-shared `scoring.list_logprobs` (image + prompt once per
list), `m = summed log-prob / response length`, and each list is cut down to its selected pair
(a K = 2 list, MAS as its rewards) before the reference log-probs and the DPO updates.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

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


# ----------------------------------------------------------------------------- MAS scorers

# A MAS scorer maps (texts [K], example, target) -> [K] float in [0, 1]; `example` has
# .image (HWC uint8) and .question. Built lazily from the config by a factory.
MasScorer = Callable[[Sequence[str], Any, Any], np.ndarray]
MAS_SCORERS: dict[str, Callable[[Any], MasScorer]] = {}


def register_mas_scorer(name: str, factory: Callable[[Any], MasScorer], *,
                        overwrite: bool = False) -> None:
    """Registers `factory(cfg) -> scorer` under `name` (the config's `m3po.mas`)."""
    if name in ("reward", "clip") or (name in MAS_SCORERS and not overwrite):
        raise ValueError(f"MAS scorer {name!r} is already defined")
    MAS_SCORERS[name] = factory


@functools.lru_cache(maxsize=2)
def _clip_scorer(path: str):
    from perpo_jax.models.clip_text import ClipScorer

    return ClipScorer.from_hf(path)


def mas_scorer(cfg) -> MasScorer | None:
    """The scorer of `cfg.m3po.mas`; None for "reward" (the task reward is the MAS)."""
    name = cfg.m3po.mas
    if name == "reward":
        return None
    if name == "clip":
        if not cfg.m3po.clip_path:
            raise ValueError("m3po.mas=clip needs m3po.clip_path (a local HF CLIPModel dir)")
        scorer = _clip_scorer(cfg.m3po.clip_path)
        return lambda texts, example, target: scorer.mas(example.image, list(texts))
    if name not in MAS_SCORERS:
        raise ValueError(f"m3po.mas={name!r}: not reward, clip or a registered scorer "
                         f"({sorted(MAS_SCORERS)})")
    return MAS_SCORERS[name](cfg)


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


def build_policy_logps(graphdef, params, frozen, *, mesh, shared_prefix: bool = True):
    """Jitted policy_logps(params, frozen, batch) -> [B, K] float32 summed log-probs of the
    candidates under the current POLICY (prefix-shared: image + prompt once per list)."""
    import jax

    from perpo_jax.mesh import batch_sharding, state_shardings
    from perpo_jax.scoring import list_logprobs
    from perpo_jax.train.step import policy_model

    def fn(params, frozen, batch):
        return jax.lax.stop_gradient(
            list_logprobs(policy_model(graphdef, params, frozen), batch,
                          shared_prefix=shared_prefix))

    return jax.jit(fn, in_shardings=(state_shardings(params, mesh), state_shardings(frozen, mesh),
                                     batch_sharding(mesh, 1)),
                   out_shardings=batch_sharding(mesh, 2))


def select_round_pairs(lists, policy_fn, state, frozen, mesh, rows: int, most_lists: int,
                       m3po_cfg, seed: int, round_index: int):
    """Cuts a round's ListSet (K candidates per list, rewards = MAS) down to one pair per list
    with the configured pairing. The policy's mean token log-probs are computed in batches of
    `rows` lists (every host makes ceil(most_lists / rows) calls). Returns a new ListSet."""
    from perpo_jax.train.hosts import local_rows, to_global
    from perpo_jax.train.listset import ListSet

    n = len(lists)
    summed = np.zeros(lists.arrays["rewards"].shape, np.float32) if lists.arrays else None
    if m3po_cfg.pairs == "m3p" and most_lists:
        if policy_fn is None:
            raise ValueError("m3po.pairs=m3p needs the policy's log-probs (policy_fn)")
        for start in range(0, most_lists, rows):
            idx = list(range(start, min(start + rows, n)))
            batch = to_global(lists.step_batch(idx, rows), mesh)
            out = local_rows(policy_fn(state.params, frozen, batch))
            summed[start:start + len(idx)] = out[:len(idx)]
    stats = dict(lists.stats)
    if not n:
        stats.update(pairs_kept=0.0, dropped_no_pair=0.0)
        return ListSet(lists.arrays, stats)
    mean_logp = mean_token_logps(summed, lists.arrays["response_mask"])
    mas = np.clip(lists.arrays["rewards"], 0.0, 1.0)
    mask = lists.arrays["list_mask"]
    chosen, rejected, valid = select_pairs(
        m3po_cfg.pairs, mas, mean_logp, mask, alpha=m3po_cfg.alpha, lam=m3po_cfg.lam,
        delta=m3po_cfg.delta, rng=np.random.default_rng([seed, round_index, 15]))
    stats.update(pairs_kept=float(valid.sum()), dropped_no_pair=float((~valid).sum()),
                 lists_kept=float(valid.sum()))
    if valid.any():
        rows_ = np.flatnonzero(valid)
        conf = confidence(mean_logp)
        stats["negative_confidence"] = float(conf[rows_, rejected[rows_]].mean())
        stats["negative_mas"] = float(mas[rows_, rejected[rows_]].mean())
        stats["chosen_mas"] = float(mas[rows_, chosen[rows_]].mean())
        return ListSet(pair_arrays(lists.arrays, chosen, rejected, valid, mas), stats)
    return ListSet({}, stats)
