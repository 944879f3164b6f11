"""Listwise preference losses: PerPO, LiPO (uniform all-pairs), LiPO-lambda and DPO.

Every loss is written for ONE candidate list (arrays of shape ``[K]``) and batched over lists
with ``jax.vmap``. The public functions take ``[B, K]`` arrays:

- ``policy_logps``, ``ref_logps``: log-probabilities of each candidate response SUMMED over its
  tokens, under the policy and the frozen reference model;
- ``rewards``: the discriminative reward of each candidate (IoU, 1 - normalised edit distance);
- ``mask``: bool, True for real candidates, False for padding.

With ``s = policy_logps - ref_logps`` the implicit reward of a candidate is ``beta * s``.

A list is *valid* when it has at least one strictly ordered pair of real candidates
(``R_i > R_j``); for DPO that is the same as "best reward > worst reward". Invalid lists (all
rewards tied, fewer than two real candidates) contribute nothing and are left out of the batch
mean. A batch without any valid list gives loss exactly 0 and a zero gradient (never NaN).
Padded candidates may hold any value, even ``-inf``/NaN: they are replaced before any math.

Each function returns ``(loss, metrics)``; ``loss`` is a float32 scalar and ``metrics`` holds
float32 scalars computed over valid lists only:

- ``pair_accuracy``: fraction of all strictly ordered pairs (``R_i > R_j``) of the valid lists
  in the batch with ``s_i > s_j``; every pair counts once (pooled over the batch, not a mean of
  per-list accuracies). The same definition for every loss, so runs are comparable.
- ``chosen_reward`` / ``rejected_reward``: mean ``beta * s`` of the best / worst candidate
  (highest / lowest reward; on a tie the first in list order);
- ``margin``: mean ``beta * (s_best - s_worst)``;
- ``num_valid_lists``: how many lists entered the mean.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
# Per-list function: (s [K], rewards [K], mask [K]) -> (loss, valid, metric sums).
ListFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, Metrics]]


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


def _list_metrics(s: jax.Array, rewards: jax.Array, mask: jax.Array, beta: float) -> Metrics:
    """Per-list metric SUMS (reduced over valid lists by ``_batched``)."""
    pair_mask, _ = _ordered_pairs(rewards, mask)
    correct = pair_mask & (s[:, None] > s[None, :])
    best, worst = _best_worst(rewards, mask)
    chosen, rejected = beta * s[best], beta * s[worst]
    return {
        "num_pairs": pair_mask.sum().astype(jnp.float32),
        "num_correct": correct.sum().astype(jnp.float32),
        "chosen_reward": chosen,
        "rejected_reward": rejected,
        "margin": chosen - rejected,
    }


def _prepare(policy_logps, ref_logps, rewards, mask):
    """Validate [B, K] inputs; return float32 s (0 on padding), rewards (0 on padding), bool mask."""
    arrays = {"policy_logps": policy_logps, "ref_logps": ref_logps,
              "rewards": rewards, "mask": mask}
    shapes = {name: jnp.shape(x) for name, x in arrays.items()}
    if len(shapes["policy_logps"]) != 2:
        raise ValueError(f"policy_logps must be [B, K], got shape {shapes['policy_logps']}")
    for name, shape in shapes.items():
        if shape != shapes["policy_logps"]:
            raise ValueError(f"{name} has shape {shape}, expected {shapes['policy_logps']} "
                             "(the shape of policy_logps)")
    mask = jnp.asarray(mask).astype(bool)
    policy = jnp.asarray(policy_logps, jnp.float32)
    ref = jnp.asarray(ref_logps, jnp.float32)
    # Padding may hold -inf/NaN; `where` (not multiplication) keeps both value and grad clean.
    s = jnp.where(mask, policy - ref, 0.0)
    rewards = jnp.where(mask, jnp.asarray(rewards, jnp.float32), 0.0)
    return s, jax.lax.stop_gradient(rewards), mask


def _batched(list_fn: ListFn, policy_logps, ref_logps, rewards, mask):
    """vmap ``list_fn`` over lists, then mean the loss and metrics over valid lists."""
    s_bk, r_bk, m_bk = _prepare(policy_logps, ref_logps, rewards, mask)
    loss_b, valid_b, sums = jax.vmap(list_fn)(s_bk, r_bk, m_bk)
    num_valid = valid_b.sum().astype(jnp.float32)

    def valid_sum(x_b):
        return jnp.where(valid_b, x_b, 0.0).sum()

    loss = _safe_div(valid_sum(loss_b), num_valid)
    metrics = {
        "pair_accuracy": _safe_div(valid_sum(sums["num_correct"]), valid_sum(sums["num_pairs"])),
        "chosen_reward": _safe_div(valid_sum(sums["chosen_reward"]), num_valid),
        "rejected_reward": _safe_div(valid_sum(sums["rejected_reward"]), num_valid),
        "margin": _safe_div(valid_sum(sums["margin"]), num_valid),
        "num_valid_lists": num_valid,
    }
    return loss, metrics


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
    return loss, pair_mask.any(), _list_metrics(s, rewards, mask, beta)


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
    return loss, pair_mask.any(), _list_metrics(s, rewards, mask, beta)


def _dpo_list(s: jax.Array, rewards: jax.Array, mask: jax.Array, *, beta: float,
              label_smoothing: float) -> tuple[jax.Array, jax.Array, Metrics]:
    """DPO loss of one list ``[K]``: best vs worst real candidate, conservative-DPO smoothing.

    ``-(1 - eps) log sigma(beta d) - eps log sigma(-beta d)``, ``d = s_best - s_worst``.
    """
    best, worst = _best_worst(rewards, mask)
    valid = (mask.sum() >= 2) & (rewards[best] > rewards[worst])
    logit = beta * (s[best] - s[worst])
    loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logit)
            - label_smoothing * jax.nn.log_sigmoid(-logit))
    return jnp.where(valid, loss, 0.0), valid, _list_metrics(s, rewards, mask, beta)


def perpo_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1,
               gamma: float = 0.5) -> tuple[jax.Array, Metrics]:
    """PerPO listwise loss over ``[B, K]`` lists, mean over valid lists. gamma=0 is LiPO."""
    def list_fn(s, r, m):
        return _perpo_list(s, r, m, beta=beta, gamma=gamma)
    return _batched(list_fn, policy_logps, ref_logps, rewards, mask)


def lipo_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1
              ) -> tuple[jax.Array, Metrics]:
    """Uniform all-pairs listwise loss (the PerPO paper's LiPO baseline): PerPO with gamma=0."""
    return perpo_loss(policy_logps, ref_logps, rewards, mask, beta=beta, gamma=0.0)


def lipo_lambda_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1
                     ) -> tuple[jax.Array, Metrics]:
    """LiPO-lambda loss over ``[B, K]`` lists (unnormalised lambda weights), mean over valid lists."""
    def list_fn(s, r, m):
        return _lipo_lambda_list(s, r, m, beta=beta)
    return _batched(list_fn, policy_logps, ref_logps, rewards, mask)


def dpo_loss(policy_logps, ref_logps, rewards, mask, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
    """Best-vs-worst DPO over ``[B, K]`` lists (K=2 is classic DPO), mean over valid lists."""
    def list_fn(s, r, m):
        return _dpo_list(s, r, m, beta=beta, label_smoothing=label_smoothing)
    return _batched(list_fn, policy_logps, ref_logps, rewards, mask)


# Name -> loss, for the trainer's config key `loss`. Every entry takes
# (policy_logps, ref_logps, rewards, mask, *, beta, ...) and returns (loss, metrics).
LOSSES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "perpo": perpo_loss,
    "lipo": lipo_loss,
    "lipo_lambda": lipo_lambda_loss,
    "dpo": dpo_loss,
}
