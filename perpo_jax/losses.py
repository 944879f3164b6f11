"""Listwise preference losses: PerPO, LiPO (uniform all-pairs), LiPO-lambda, DPO (and
conservative DPO), IPO, and the reference-free SimPO and ORPO.

Every loss is written for ONE candidate list (arrays of shape ``[K]``) and batched over lists
with ``jax.vmap``. The public functions take ``[B, K]`` arrays:

- ``policy_logps``, ``ref_logps``: log-probabilities of each candidate response SUMMED over its
  tokens, under the policy and the frozen reference model;
- ``rewards``: the discriminative reward of each candidate (IoU, 1 - normalised edit distance);
- ``mask``: bool, True for real candidates, False for padding;
- ``lengths`` (reference-free losses only): the number of response tokens of each candidate
  (``response_mask.sum(-1)``), for their length-normalised log-probabilities.

Reference losses (perpo, lipo, lipo_lambda, dpo, ipo) are called as
``fn(policy_logps, ref_logps, rewards, mask, *, beta, ...)``; with ``s = policy_logps -
ref_logps`` the implicit reward of a candidate is ``beta * s``. Reference-free losses (simpo,
orpo; ``REFERENCE_FREE_LOSSES``) take no reference log-probs at all:
``fn(policy_logps, rewards, mask, *, lengths, ...)``; their score is the length-normalised
log-prob ``m = policy_logps / lengths`` (a real candidate with 0 tokens counts as 1 token).

A list is *valid* when it has at least one strictly ordered pair of real candidates
(``R_i > R_j``); for the best-vs-worst losses (dpo, ipo, simpo, orpo) that is the same as "best
reward > worst reward". Invalid lists (all rewards tied, fewer than two real candidates)
contribute nothing and are left out of the batch mean. A batch without any valid list gives
loss exactly 0 and a zero gradient (never NaN). Padded candidates may hold any value, even
``-inf``/NaN (and any length): they are replaced before any math.

Each function returns ``(loss, metrics)``; ``loss`` is a float32 scalar and ``metrics`` holds
float32 scalars computed over valid lists only:

- ``pair_accuracy``: fraction of all strictly ordered pairs (``R_i > R_j``) of the valid lists
  in the batch whose score is ordered the same way (``s_i > s_j``; ``m_i > m_j`` for the
  reference-free losses); every pair counts once (pooled over the batch, not a mean of
  per-list accuracies). The same definition for every loss, so runs are comparable.
- ``chosen_reward`` / ``rejected_reward``: mean implicit reward of the best / worst candidate
  (highest / lowest reward; on a tie the first in list order): ``beta * s`` for the reference
  losses, SimPO's own reward ``beta * m``, and ORPO's log-odds ``log(P / (1 - P))``,
  ``P = exp(m)``;
- ``margin``: mean chosen minus rejected implicit reward (for ORPO: the log odds ratio);
- ``num_valid_lists``: how many lists entered the mean;
- ORPO only: ``nll``, the mean SFT term (token-mean NLL of the best candidate).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
# Per-list function: (score [K], rewards [K], mask [K]) -> (loss, valid, metric sums).
ListFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, Metrics]]

# ORPO's odds P / (1 - P) are infinite at P = 1 (token-mean log-prob 0, reachable in float32 by
# a very confident model and by a real candidate with no tokens): clamp log P to at most this
# (P <= 1 - 1e-6, log-odds <= 13.8), so the loss and its gradient stay finite.
ORPO_MAX_MEAN_LOGP = -1e-6


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den == 0; both branches finite so the gradient is finite too."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def _ordered_pairs(rewards: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairs (i, j) of real candidates with R_i > R_j.

    Returns ``pair_mask [K, K]`` bool and ``reward_gap [K, K]`` = R_i - R_j (garbage where the
    pair is not valid: always read it through ``pair_mask``).
    """
    gap_kk = rewards[:, None] - rewards[None, :]
    both_kk = mask[:, None] & mask[None, :]
    return both_kk & (gap_kk > 0), gap_kk


def _pair_losses(s: jax.Array, beta: float) -> jax.Array:
    """[K, K] logistic loss -log sigma(beta (s_i - s_j)) of preferring i over j."""
    return -jax.nn.log_sigmoid(beta * (s[:, None] - s[None, :]))


def _best_worst(rewards: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices of the highest / lowest reward among real candidates (first on ties)."""
    best = jnp.argmax(jnp.where(mask, rewards, -jnp.inf))
    worst = jnp.argmin(jnp.where(mask, rewards, jnp.inf))
    return best, worst


def _best_worst_pair(rewards: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(best, worst, valid): the pair of the best-vs-worst losses; valid iff >= 2 real
    candidates and best reward > worst reward."""
    best, worst = _best_worst(rewards, mask)
    valid = (mask.sum() >= 2) & (rewards[best] > rewards[worst])
    return best, worst, valid


def _list_metrics(score: jax.Array, implicit_reward: jax.Array, rewards: jax.Array,
                  mask: jax.Array) -> Metrics:
    """Per-list metric SUMS (reduced over valid lists by ``_batched``).

    ``score [K]`` orders candidates for ``pair_accuracy``; ``implicit_reward [K]`` gives
    chosen / rejected reward (best / worst candidate) and their margin.
    """
    pair_mask, _ = _ordered_pairs(rewards, mask)
    correct = pair_mask & (score[:, None] > score[None, :])
    best, worst = _best_worst(rewards, mask)
    chosen, rejected = implicit_reward[best], implicit_reward[worst]
    return {
        "num_pairs": pair_mask.sum().astype(jnp.float32),
        "num_correct": correct.sum().astype(jnp.float32),
        "chosen_reward": chosen,
        "rejected_reward": rejected,
        "margin": chosen - rejected,
    }


def _check_shapes(arrays: dict) -> None:
    """Every array [B, K], the shape of the first one (``policy_logps``)."""
    shapes = {name: jnp.shape(x) for name, x in arrays.items()}
    first = next(iter(shapes))
    if len(shapes[first]) != 2:
        raise ValueError(f"{first} must be [B, K], got shape {shapes[first]}")
    for name, shape in shapes.items():
        if shape != shapes[first]:
            raise ValueError(f"{name} has shape {shape}, expected {shapes[first]} "
                             f"(the shape of {first})")


def _clean_rewards_mask(rewards, mask):
    mask = jnp.asarray(mask).astype(bool)
    rewards = jnp.where(mask, jnp.asarray(rewards, jnp.float32), 0.0)
    return jax.lax.stop_gradient(rewards), mask


def _prepare(policy_logps, ref_logps, rewards, mask):
    """Validate [B, K] inputs; return float32 s (0 on padding), rewards (0 on padding), bool mask."""
    _check_shapes({"policy_logps": policy_logps, "ref_logps": ref_logps,
                   "rewards": rewards, "mask": mask})
    rewards, mask = _clean_rewards_mask(rewards, mask)
    policy = jnp.asarray(policy_logps, jnp.float32)
    ref = jnp.asarray(ref_logps, jnp.float32)
    # Padding may hold -inf/NaN; `where` (not multiplication) keeps both value and grad clean.
    return jnp.where(mask, policy - ref, 0.0), rewards, mask


def _prepare_reference_free(policy_logps, lengths, rewards, mask):
    """Validate [B, K] inputs; return float32 token-mean log-probs m (0 on padding), rewards
    (0 on padding), bool mask. A real candidate's length is clamped to >= 1 token."""
    _check_shapes({"policy_logps": policy_logps, "lengths": lengths,
                   "rewards": rewards, "mask": mask})
    rewards, mask = _clean_rewards_mask(rewards, mask)
    policy = jnp.asarray(policy_logps, jnp.float32)
    count = jnp.maximum(jax.lax.stop_gradient(jnp.asarray(lengths, jnp.float32)), 1.0)
    # The padded slots' count is 1 too, so the division's gradient is finite before `where`.
    count = jnp.where(mask, count, 1.0)
    return jnp.where(mask, policy / count, 0.0), rewards, mask


def _batched(list_fn: ListFn, score_bk, rewards_bk, mask_bk):
    """vmap ``list_fn`` over prepared [B, K] lists, then mean the loss and metrics over valid
    lists. Metric sums beyond the common ones (e.g. ORPO's ``nll``) are means over valid lists."""
    loss_b, valid_b, sums = jax.vmap(list_fn)(score_bk, rewards_bk, mask_bk)
    num_valid = valid_b.sum().astype(jnp.float32)

    def valid_sum(x_b):
        return jnp.where(valid_b, x_b, 0.0).sum()

    loss = _safe_div(valid_sum(loss_b), num_valid)
    metrics = {"pair_accuracy": _safe_div(valid_sum(sums.pop("num_correct")),
                                          valid_sum(sums.pop("num_pairs")))}
    for name, x_b in sums.items():
        metrics[name] = _safe_div(valid_sum(x_b), num_valid)
    metrics["num_valid_lists"] = num_valid
    return loss, metrics


# ----------------------------------------------------------------------------- reference losses


def _perpo_list(s: jax.Array, rewards: jax.Array, mask: jax.Array, *,
                beta: float, gamma: float) -> tuple[jax.Array, jax.Array, Metrics]:
    """PerPO loss of one list ``[K]``: -sum_{R_i > R_j} w_ij log sigma(beta (s_i - s_j)).

    ``w_ij = (R_i - R_j)^gamma`` normalised to sum 1 over the list's ordered pairs.
    """
    pair_mask, gap_kk = _ordered_pairs(rewards, mask)
    # Put 1 into invalid slots BEFORE the power: 0^gamma (and its gradient at 0) never appears,
    # so gamma = 0 gives exactly uniform weights over valid pairs.
    weight_kk = jnp.where(pair_mask, jnp.where(pair_mask, gap_kk, 1.0) ** gamma, 0.0)
    weight_kk = _safe_div(weight_kk, weight_kk.sum())
    loss = jnp.where(pair_mask, weight_kk * _pair_losses(s, beta), 0.0).sum()
    return loss, pair_mask.any(), _list_metrics(s, beta * s, rewards, mask)


def _descending_ranks(s: jax.Array, mask: jax.Array) -> jax.Array:
    """1-based rank of each real candidate by s, descending; ties broken by list order."""
    idx = jnp.arange(s.shape[0])
    # above_kk[i, j]: candidate j ranks above candidate i.
    above_kk = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (idx[None, :] < idx[:, None]))
    return 1.0 + (above_kk & mask[None, :]).sum(axis=1).astype(jnp.float32)


def _lipo_lambda_list(s: jax.Array, rewards: jax.Array, mask: jax.Array, *,
                      beta: float) -> tuple[jax.Array, jax.Array, Metrics]:
    """LiPO-lambda loss of one list ``[K]`` (Liu et al. 2024, eq. for L_lambda-loss).

    ``-sum_{R_i > R_j} Delta_ij log sigma(beta (s_i - s_j))`` with the LambdaLoss weight
    ``Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|``, gain ``G = 2^R - 1``, discount
    ``D(tau) = log2(1 + tau)`` and ``tau`` the 1-based rank of s among real candidates
    (descending). The ranks are constants for the gradient. Weights are NOT normalised per
    list (as in the paper), so the loss scale grows with the gains and the list length.
    """
    pair_mask, _ = _ordered_pairs(rewards, mask)
    tau = jax.lax.stop_gradient(_descending_ranks(s, mask))
    gain = jnp.exp2(rewards) - 1.0
    inv_discount = 1.0 / jnp.log2(1.0 + tau)
    delta_kk = (jnp.abs(gain[:, None] - gain[None, :])
                * jnp.abs(inv_discount[:, None] - inv_discount[None, :]))
    loss = jnp.where(pair_mask, delta_kk * _pair_losses(s, beta), 0.0).sum()
    return loss, pair_mask.any(), _list_metrics(s, beta * s, rewards, mask)


def _dpo_list(s: jax.Array, rewards: jax.Array, mask: jax.Array, *, beta: float,
              label_smoothing: float) -> tuple[jax.Array, jax.Array, Metrics]:
    """DPO loss of one list ``[K]``: best vs worst real candidate, conservative-DPO smoothing.

    ``-(1 - eps) log sigma(beta d) - eps log sigma(-beta d)``, ``d = s_best - s_worst``
    (Mitchell 2023, "A note on DPO with noisy preferences", eq. 3 / TRL's ``sigmoid`` loss
    with ``label_smoothing``); eps = 0 is DPO (Rafailov et al. 2023, eq. 7).
    """
    best, worst, valid = _best_worst_pair(rewards, mask)
    logit = beta * (s[best] - s[worst])
    loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logit)
            - label_smoothing * jax.nn.log_sigmoid(-logit))
    return jnp.where(valid, loss, 0.0), valid, _list_metrics(s, beta * s, rewards, mask)


def _ipo_list(s: jax.Array, rewards: jax.Array, mask: jax.Array, *,
              beta: float) -> tuple[jax.Array, jax.Array, Metrics]:
    """IPO loss of one list ``[K]`` (Azar et al. 2023, eq. 17), best vs worst real candidate.

    ``(h - 1 / (2 tau))^2``, ``h = s_best - s_worst``, ``tau = beta``.
    """
    best, worst, valid = _best_worst_pair(rewards, mask)
    loss = jnp.square(s[best] - s[worst] - 0.5 / beta)
    return jnp.where(valid, loss, 0.0), valid, _list_metrics(s, beta * s, rewards, mask)


def perpo_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1,
               gamma: float = 0.5) -> tuple[jax.Array, Metrics]:
    """PerPO listwise loss over ``[B, K]`` lists, mean over valid lists. gamma=0 is LiPO."""
    def list_fn(s, r, m):
        return _perpo_list(s, r, m, beta=beta, gamma=gamma)
    return _batched(list_fn, *_prepare(policy_logps, ref_logps, rewards, mask))


def lipo_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1
              ) -> tuple[jax.Array, Metrics]:
    """Uniform all-pairs listwise loss (the PerPO paper's LiPO baseline): PerPO with gamma=0."""
    return perpo_loss(policy_logps, ref_logps, rewards, mask, beta=beta, gamma=0.0)


def lipo_lambda_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1
                     ) -> tuple[jax.Array, Metrics]:
    """LiPO-lambda loss over ``[B, K]`` lists (unnormalised lambda weights), mean over valid lists."""
    def list_fn(s, r, m):
        return _lipo_lambda_list(s, r, m, beta=beta)
    return _batched(list_fn, *_prepare(policy_logps, ref_logps, rewards, mask))


def dpo_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Best-vs-worst DPO over ``[B, K]`` lists (K=2 is classic DPO), mean over valid lists.

    ``label_smoothing`` eps in [0, 0.5) makes it conservative DPO (cDPO): the preference label
    is taken to be flipped with probability eps.
    """
    def list_fn(s, r, m):
        return _dpo_list(s, r, m, beta=beta, label_smoothing=label_smoothing)
    return _batched(list_fn, *_prepare(policy_logps, ref_logps, rewards, mask))


def ipo_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1
             ) -> tuple[jax.Array, Metrics]:
    """IPO (Azar et al. 2023, eq. 17) over ``[B, K]`` lists, mean over valid lists.

    ONE pair per list, best vs worst real candidate, as ``dpo``: the two losses then differ
    only in their shape (IPO regresses the log-ratio gap h to 1 / (2 tau) instead of pushing
    it to infinity), and K=2 is the paper's / TRL's ``ipo``. All ordered pairs of a ranked list
    would ask for h_ij = 1 / (2 tau) on every pair at once, which no policy can satisfy
    (h_13 = h_12 + h_23); the listwise losses above are the all-pairs ones.
    ``tau = beta``. Log-probs are SUMMED over tokens, as the paper's pi(y|x) is the sequence
    probability (TRL divides them by the token count for ``ipo``; not done here, so tau values
    tuned with TRL do not carry over).
    """
    def list_fn(s, r, m):
        return _ipo_list(s, r, m, beta=beta)
    return _batched(list_fn, *_prepare(policy_logps, ref_logps, rewards, mask))


# ----------------------------------------------------------------------------- reference-free


def _simpo_list(m: jax.Array, rewards: jax.Array, mask: jax.Array, *, beta: float,
                gamma_beta_ratio: float) -> tuple[jax.Array, jax.Array, Metrics]:
    """SimPO loss of one list ``[K]`` of token-mean log-probs m, best vs worst candidate.

    ``-log sigma(beta m_best - beta m_worst - gamma)``, ``gamma = gamma_beta_ratio * beta``.
    """
    best, worst, valid = _best_worst_pair(rewards, mask)
    logit = beta * (m[best] - m[worst] - gamma_beta_ratio)
    loss = -jax.nn.log_sigmoid(logit)
    return jnp.where(valid, loss, 0.0), valid, _list_metrics(m, beta * m, rewards, mask)


def _log_odds(m: jax.Array) -> jax.Array:
    """log(P / (1 - P)) with log P = m (clamped to ORPO_MAX_MEAN_LOGP), computed stably:
    log(1 - e^m) is log(-expm1(m)) near 0 and log1p(-exp(m)) below -log 2 (Maechler 2012)."""
    m = jnp.minimum(m, ORPO_MAX_MEAN_LOGP)
    log1m_p = jnp.where(m > -jnp.log(2.0), jnp.log(-jnp.expm1(m)), jnp.log1p(-jnp.exp(m)))
    return m - log1m_p


def _orpo_list(m: jax.Array, rewards: jax.Array, mask: jax.Array, *,
               lam: float) -> tuple[jax.Array, jax.Array, Metrics]:
    """ORPO loss of one list ``[K]`` of token-mean log-probs m, best vs worst candidate.

    ``-m_best - lam log sigma(log odds_best - log odds_worst)`` (SFT NLL + lam * L_OR).
    """
    best, worst, valid = _best_worst_pair(rewards, mask)
    log_odds = _log_odds(m)
    nll = -m[best]
    loss = nll - lam * jax.nn.log_sigmoid(log_odds[best] - log_odds[worst])
    metrics = dict(_list_metrics(m, log_odds, rewards, mask), nll=nll)
    return jnp.where(valid, loss, 0.0), valid, metrics


def simpo_loss(policy_logps, rewards, mask, *, lengths, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5) -> tuple[jax.Array, Metrics]:
    """SimPO (Meng et al. 2024) over ``[B, K]`` lists, mean over valid lists.

    Reference-free: the reward of a candidate is ``beta * m``, ``m = policy_logps / lengths``
    (log-prob averaged over its response tokens). Loss ``-log sigma(beta (m_w - m_l) - gamma)``
    on ONE pair per list, best vs worst (the paper's pairs; K=2 is the paper's loss), with the
    target margin ``gamma = gamma_beta_ratio * beta`` as in the official code
    (``gamma_beta_ratio``; the paper recommends beta 2.0-2.5 and gamma / beta 0.5 to start).
    """
    def list_fn(m, r, k):
        return _simpo_list(m, r, k, beta=beta, gamma_beta_ratio=gamma_beta_ratio)
    return _batched(list_fn, *_prepare_reference_free(policy_logps, lengths, rewards, mask))


def orpo_loss(policy_logps, rewards, mask, *, lengths, lam: float = 0.1
              ) -> tuple[jax.Array, Metrics]:
    """ORPO (Hong et al. 2024) over ``[B, K]`` lists, mean over valid lists.

    Reference-free: ``L = L_SFT + lam * L_OR`` on ONE pair per list, best (y_w) vs worst (y_l):
    ``L_SFT = -m_w`` (token-mean NLL of the best candidate, m = policy_logps / lengths),
    ``L_OR = -log sigma(log odds(y_w) - log odds(y_l))``, ``odds = P / (1 - P)``,
    ``P = exp(m)``. ``lam`` 0.1 as the official Mistral-ORPO recipe and TRL's ORPOConfig.beta.
    L_SFT here is each list's own token mean, averaged over lists (TRL pools the chosen tokens
    of the whole batch into one mean instead).
    """
    def list_fn(m, r, k):
        return _orpo_list(m, r, k, lam=lam)
    return _batched(list_fn, *_prepare_reference_free(policy_logps, lengths, rewards, mask))


# Name -> loss, for the trainer's config key `loss.name`. Reference losses take
# (policy_logps, ref_logps, rewards, mask, *, beta, ...); the REFERENCE_FREE_LOSSES take
# (policy_logps, rewards, mask, *, lengths, ...). Each returns (loss, metrics).
LOSSES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "perpo": perpo_loss,
    "lipo": lipo_loss,
    "lipo_lambda": lipo_lambda_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})
