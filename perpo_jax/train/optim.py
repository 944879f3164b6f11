"""AdamW with warmup + cosine/linear/constant schedule and global-norm clipping.

The learning rate is NOT inside the optax chain: the chain computes AdamW's update for
lr = 1 (clip → Adam moments → decoupled weight decay → negate) and the step multiplies it by
`schedule(t)`, t = the update's index in the run's plan (`TrainState.step`). optax's own
count only advances when an update is applied, so an lr read from it would fall behind at
every skipped (non-finite) update or list-less round and never reach the schedule's end.

Gradient accumulation is NOT done here: `perpo_jax.train.step` scans over micro-batches of
lists (`microbatched`) and applies this optimizer once per step, so one step == one update.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Number of warmup updates: ceil(ratio · total), as transformers' Trainer counts them."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return int(math.ceil(warmup_ratio * total_steps))


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """lr(update index) for `cfg` (`perpo_jax.config.OptimConfig`) over `total_steps` updates.

    Linear warmup 0 -> lr over `cfg.warmup_steps` updates when > 0, else over
    `warmup_steps(cfg.warmup_ratio, total)`, then cosine / linear decay to 0 at
    `total_steps` (HF `get_cosine_schedule_with_warmup` / `get_linear_schedule_with_warmup`),
    or constant.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    # a fixed warmup_steps > 0 wins over the ratio and is not clamped to the run, as in HF
    # TrainingArguments (a run shorter than its warmup ends mid-ramp)
    warm = cfg.warmup_steps if cfg.warmup_steps > 0 else warmup_steps(cfg.warmup_ratio, total_steps)
    decay = max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps=decay, alpha=0.0)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, transition_steps=decay)
    else:
        after = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return after
    ramp = optax.linear_schedule(0.0, cfg.lr, transition_steps=warm)
    return optax.join_schedules([ramp, after], boundaries=[warm])


def _decay_mask(params):
    """Weight decay on matrices only (not norms / biases), as the HF Trainer does."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax chain giving AdamW's update at lr = 1, lr schedule) for `cfg` (`OptimConfig`).

    Chain: clip_by_global_norm(grad_clip) -> scale_by_adam(b1, b2, eps) ->
    add_decayed_weights(weight_decay, >=2-D params) -> scale(-1). The update of step t is `schedule(t) * chain_update`, which is exactly optax.adamw(schedule)'s update
    when no step is skipped. Optimizer state has the params' tree structure, so it is sharded
    with the same rules (see `train.state`). A run's config must have grad_clip > 0
    (validation rejects 0, which reads like "clip everything"); a direct caller passing an
    `OptimConfig` with grad_clip <= 0 gets no clipping.
    """
    if cfg.grad_accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {cfg.grad_accum}")
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
              optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
              optax.scale(-1.0)]
    return optax.chain(*parts), schedule
