"""The jitted, sharded training step and the reference / policy log-prob helpers.

    step = build_train_step(parts.graphdef, state, frozen, reference, loss_cfg=..., optimizer=...,
                            schedule=..., mesh=mesh, grad_accum=2)
    state, metrics = step(state, frozen, reference, batch)

One `jax.jit` with explicit shardings: params / optimizer state by the logical rules, the
list batch over (data, fsdp), the train state donated; `frozen` (base weights) and `reference`
are read-only inputs. The loss is computed from `scoring.list_logprobs` + `losses.LOSSES`
(or token NLL for `sft`); gradients are taken wrt the trainable params only. Reference-free
losses (`losses.REFERENCE_FREE_LOSSES`: simpo, orpo) never run the reference model and ignore
any `batch["ref_logps"]`; they get each candidate's token count from `response_mask`. Gradient
accumulation scans over micro-batches of lists (`microbatched`), so one call is one update.
A non-finite loss or gradient norm, or a batch with no valid list, skips the update (params
and optimizer state unchanged, `skipped` += 1).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perpo_jax.losses import LOSSES, REFERENCE_FREE_LOSSES
from perpo_jax.mesh import batch_sharding, state_shardings, traced_under_mesh
from perpo_jax.scoring import list_logprobs, response_token_logps
from perpo_jax.train.state import TrainState, reference_state, train_state_shardings

LOSS_NAMES = (*LOSSES, "sft")
# Metrics that add up over micro-batches; every other metric is a list-weighted mean.
SUMMED_METRICS = ("num_valid_lists", "tokens")


def uses_reference(loss_name: str) -> bool:
    """Whether `loss.name` needs reference log-probs (in the step or precomputed with the lists)."""
    return loss_name in LOSSES and loss_name not in REFERENCE_FREE_LOSSES


# ----------------------------------------------------------------------------- models


def policy_model(graphdef, params, frozen, key=None):
    """The trainable model; with `key`, LoRA dropout is active (train mode) seeded by `key`."""
    # copy=True: fresh Variables in the current trace, so dropout may advance its RNG count
    # and nnx.remat (ModelConfig.remat) may write back state under jax.grad
    model = nnx.merge(graphdef, params, frozen, copy=True)
    if key is None:
        return model
    nnx.reseed(model, dropout=key, policy=_stream_key)
    return nnx.view(model, deterministic=False, raise_if_not_found=False)


def _stream_key(path, key, shape):
    """The step key -> one dropout stream's key: its own per module path (so q/k/v adapters,
    which see the same input, draw different masks), split [L] for a stacked module's layers.
    crc32, not hash(): the same key in every process."""
    key = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()))
    return jax.random.split(key, shape) if shape else key


def reference_model(graphdef, params, frozen, reference):
    """The frozen base: adapters zeroed, non-LoRA trainable slots at their initial values."""
    state = reference_state(jax.lax.stop_gradient(params), reference)
    return nnx.merge(graphdef, state, frozen, copy=True)  # copy: see `policy_model`


def reference_logps(graphdef, params, frozen, reference, batch, *, shared_prefix=True):
    """[B, K] float32 summed log-probs under the reference model (no gradient)."""
    model = reference_model(graphdef, params, frozen, reference)
    return jax.lax.stop_gradient(list_logprobs(model, batch, shared_prefix=shared_prefix))


def policy_logps(graphdef, params, frozen, batch, *, shared_prefix=True):
    """[B, K] float32 summed log-probs under the current policy (no gradient, no dropout)."""
    model = policy_model(graphdef, params, frozen)
    return jax.lax.stop_gradient(list_logprobs(model, batch, shared_prefix=shared_prefix))


# ----------------------------------------------------------------------------- objectives


def _num_tokens(batch, response_mask):
    return (batch["prompt_mask"].astype(jnp.float32).sum()
            + response_mask.astype(jnp.float32).sum())


def loss_kwargs(loss_cfg) -> dict:
    """The keyword arguments of `LOSSES[loss_cfg.name]` taken from the `loss.*` config keys."""
    name = loss_cfg.name
    if name == "orpo":
        return {"lam": loss_cfg.orpo_lambda}
    kwargs = {"beta": loss_cfg.beta}
    if name == "perpo":
        kwargs["gamma"] = loss_cfg.gamma
    if name == "dpo":
        kwargs["label_smoothing"] = loss_cfg.label_smoothing
    if name == "simpo":
        kwargs["gamma_beta_ratio"] = loss_cfg.simpo_gamma_beta_ratio
    return kwargs


def preference_objective(policy, ref_logps, batch, loss_cfg, *, shared_prefix=True):
    """Listwise loss on [B, K] candidates. Returns (loss, weight = valid lists, metrics).

    `ref_logps` [B, K] for a reference loss; None for a reference-free one, which gets the
    candidates' token counts `response_mask.sum(-1)` [B, K] instead.
    """
    policy_logps = list_logprobs(policy, batch, shared_prefix=shared_prefix)
    fn, kwargs = LOSSES[loss_cfg.name], loss_kwargs(loss_cfg)
    if uses_reference(loss_cfg.name):
        loss, metrics = fn(policy_logps, ref_logps, batch["rewards"], batch["list_mask"], **kwargs)
    else:
        lengths = batch["response_mask"].astype(jnp.float32).sum(axis=-1)
        loss, metrics = fn(policy_logps, batch["rewards"], batch["list_mask"], lengths=lengths,
                           **kwargs)
    metrics = dict(metrics, tokens=_num_tokens(batch, batch["response_mask"]))
    return loss, metrics["num_valid_lists"], metrics


def sft_targets(batch, sft_target: str):
    """(ids, mask) [B, 1, R] of the SFT target of each list.

    "best": the real candidate with the highest reward (first on ties);
    "ground_truth": `target_ids` / `target_mask` [B, R'] from the batch.
    """
    if sft_target == "best":
        masked = jnp.where(batch["list_mask"], batch["rewards"], -jnp.inf)
        best = jnp.argmax(masked, axis=-1)[:, None, None]  # [B, 1, 1]
        ids = jnp.take_along_axis(batch["response_ids"], best, axis=1)
        mask = jnp.take_along_axis(batch["response_mask"], best, axis=1)
        return ids, mask & batch["list_mask"].any(axis=-1)[:, None, None]
    if sft_target == "ground_truth":
        if "target_ids" not in batch or "target_mask" not in batch:
            raise KeyError("loss.sft_target='ground_truth' needs 'target_ids'/'target_mask' in the batch")
        return batch["target_ids"][:, None, :], batch["target_mask"][:, None, :]
    raise ValueError(f"loss.sft_target must be 'best' or 'ground_truth', got {sft_target!r}")


def sft_objective(policy, batch, loss_cfg, *, shared_prefix=True):
    """Mean NLL per token of each list's target, averaged over lists that have one.

    Returns (loss, weight = lists with a target, metrics).
    """
    ids, mask = sft_targets(batch, loss_cfg.sft_target)
    target_batch = dict(batch, response_ids=ids, response_mask=mask)
    logps = response_token_logps(policy, target_batch, shared_prefix=shared_prefix)[:, 0]
    count = mask[:, 0].astype(jnp.float32).sum(axis=-1)  # [B]
    has = count > 0
    nll_b = -logps.sum(axis=-1) / jnp.maximum(count, 1.0)
    weight = has.astype(jnp.float32).sum()
    loss = jnp.where(has, nll_b, 0.0).sum() / jnp.maximum(weight, 1.0)
    return loss, weight, {"nll": loss, "num_valid_lists": weight, "tokens": _num_tokens(batch, mask)}


def make_objective(graphdef, loss_cfg, *, shared_prefix=True) -> Callable:
    """objective(params, frozen, reference, batch, key) -> (loss, (weight, metrics)).

    Uses `batch["ref_logps"]` when present, else the reference model (LoRA off, no gradient);
    neither for a reference-free loss (`uses_reference`).
    """
    if loss_cfg.name not in LOSS_NAMES:
        raise ValueError(f"loss.name must be one of {LOSS_NAMES}, got {loss_cfg.name!r}")

    def objective(params, frozen, reference, batch, key):
        policy = policy_model(graphdef, params, frozen, key)
        if loss_cfg.name == "sft":
            loss, weight, metrics = sft_objective(policy, batch, loss_cfg, shared_prefix=shared_prefix)
            return loss, (weight, metrics)
        if not uses_reference(loss_cfg.name):
            ref = None
        elif "ref_logps" in batch:
            ref = jax.lax.stop_gradient(batch["ref_logps"].astype(jnp.float32))
        else:
            ref = reference_logps(graphdef, params, frozen, reference, batch, shared_prefix=shared_prefix)
        loss, weight, metrics = preference_objective(policy, ref, batch, loss_cfg, shared_prefix=shared_prefix)
        return loss, (weight, metrics)

    return objective


# ----------------------------------------------------------------------------- micro-batching


def split_microbatches(batch, num: int):
    """[B, ...] leaves -> [num, B / num, ...]; micro-batch i holds lists i, i + num, ...

    (strided, so a batch sharded over its leading dim stays sharded within each micro-batch).
    """

    def one(x):
        if x.shape[0] % num:
            raise ValueError(f"batch of {x.shape[0]} lists does not split into {num} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def microbatched(grad_fn: Callable, num_microbatches: int) -> Callable:
    """Gradient accumulation as a function wrapper (levanter style).

    grad_fn(params, batch, key) -> (loss, weight, metrics, grads) over the batch's lists.
    The wrapped function scans `grad_fn` over `num_microbatches` slices and combines them
    weighted by `weight` (valid lists), which equals one pass over the whole batch for losses
    that are means over valid lists. `SUMMED_METRICS` are added instead.
    """
    if num_microbatches == 1:
        return grad_fn

    def wrapped(params, batch, key):
        micro = split_microbatches(batch, num_microbatches)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, first, key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(acc, xs):
            mb, i = xs
            loss, weight, metrics, grads = grad_fn(params, mb, jax.random.fold_in(key, i))
            scaled = jax.tree.map(lambda x: x * weight, (loss, metrics, grads))
            new = (scaled[0], weight, scaled[1], scaled[2])
            for name in SUMMED_METRICS:
                if name in metrics:
                    new[2][name] = metrics[name]
            return jax.tree.map(jnp.add, acc, new), None

        (loss, weight, metrics, grads), _ = jax.lax.scan(
            body, zeros, (micro, jnp.arange(num_microbatches))
        )
        inv = jnp.where(weight > 0, 1.0 / jnp.where(weight > 0, weight, 1.0), 0.0)
        metrics = {k: v if k in SUMMED_METRICS else v * inv for k, v in metrics.items()}
        return loss * inv, weight, metrics, jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)

    return wrapped


# ----------------------------------------------------------------------------- the step


def _where_tree(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def train_step(state: TrainState, frozen, reference, batch, *, graphdef, loss_cfg, optimizer,
               schedule, grad_accum=1, shared_prefix=True):
    """One optimizer update (un-jitted; `build_train_step` jits it). Returns (state, metrics)."""
    objective = make_objective(graphdef, loss_cfg, shared_prefix=shared_prefix)

    def grad_fn(params, mb, key):
        (loss, (weight, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
            params, frozen, reference, mb, key
        )
        return loss, weight, metrics, grads

    key, next_rng = jax.random.split(state.rng)
    loss, weight, metrics, grads = microbatched(grad_fn, grad_accum)(state.params, batch, key)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    # A batch without any valid list must not move the weights either: AdamW would still
    # apply its momentum to a zero gradient.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (weight > 0)
    # lr of the update's place in the plan (state.step), not of optax's applied-update count
    lr = jnp.asarray(schedule(state.step), jnp.float32)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: (p + lr * u).astype(p.dtype), state.params, updates)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=_where_tree(ok, params, state.params),
        opt_state=_where_tree(ok, opt_state, state.opt_state),
        rng=next_rng,
        skipped=skipped,
    )
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        lr=lr,
        skipped=skipped,
        applied=ok.astype(jnp.int32),
    )
    return new_state, metrics


def build_train_step(graphdef, state, frozen, reference, *, loss_cfg, optimizer, schedule,
                     mesh: Mesh, grad_accum: int = 1, shared_prefix: bool = True):
    """ONE jitted step(state, frozen, reference, batch) -> (state, metrics).

    `state`, `frozen`, `reference` may be concrete or abstract (`jax.eval_shape`); they only
    fix the shardings. The train state is donated; metrics come back replicated.
    """
    state_sh = train_state_shardings(state, mesh)
    fn = functools.partial(
        train_step, graphdef=graphdef, loss_cfg=loss_cfg, optimizer=optimizer,
        schedule=schedule, grad_accum=grad_accum, shared_prefix=shared_prefix,
    )
    return jax.jit(
        traced_under_mesh(fn, mesh),
        in_shardings=(state_sh, state_shardings(frozen, mesh), state_shardings(reference, mesh),
                      batch_sharding(mesh, 1)),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,),
    )


def build_ref_logps(graphdef, params, frozen, reference, *, mesh: Mesh, shared_prefix: bool = True):
    """Jitted compute_ref_logps(params, frozen, reference, batch) -> [B, K] float32, sharded
    like a batch array (over data, fsdp) so it drops straight into `batch["ref_logps"]`.

    The reference model (LoRA off / initial values), used when lists are built so that a
    training step runs only the policy (store the result as `batch["ref_logps"]`).
    """
    fn = functools.partial(reference_logps, graphdef, shared_prefix=shared_prefix)
    return jax.jit(
        traced_under_mesh(fn, mesh),
        in_shardings=(state_shardings(params, mesh), state_shardings(frozen, mesh),
                      state_shardings(reference, mesh), batch_sharding(mesh, 1)),
        out_shardings=batch_sharding(mesh, 2),
    )


def build_policy_logps(graphdef, params, frozen, *, mesh: Mesh, shared_prefix: bool = True):
    """Jitted policy_logps(params, frozen, batch) -> [B, K] float32 summed log-probs of the
    candidates under the current POLICY (prefix-shared: image + prompt once per list), sharded
    like a batch array. M3PO's confidence of each sampled candidate (`rounds.select_round_pairs`).
    """
    fn = functools.partial(policy_logps, graphdef, shared_prefix=shared_prefix)
    return jax.jit(fn, in_shardings=(state_shardings(params, mesh), state_shardings(frozen, mesh),
                                     batch_sharding(mesh, 1)),
                   out_shardings=batch_sharding(mesh, 2))
