"""Training state: what the optimizer owns vs. the frozen base, and their shardings.

The model is split ONCE into
- `params`    — trainable variables (LoRA adapters + modules matched by `lora.trainable`, or
                every `nnx.Param` for a full fine-tune); inside `TrainState`, donated each step;
- `frozen`    — everything else (base weights, dropout RNG streams); never donated, never in
                the optimizer, read by the policy AND the reference;
- `reference` — the initial values of the NON-LoRA trainable params (empty for plain LoRA,
                the projector for the OCR recipe, a full copy for a full fine-tune). The
                reference model is `frozen` + `reference` + zeroed adapters: the base itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perpo_jax.mesh import device_put_global, state_shardings
from perpo_jax.models.lora import LoRAParam, trainable_filter


@struct.dataclass
class TrainState:
    """step: int32 [] steps taken (skipped ones included); params: trainable nnx.State;
    opt_state: optax state of `params`; rng: typed PRNG key (dropout); skipped: int32 []
    updates not applied: non-finite loss or gradient norm, or no valid list in the batch."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array


class ModelParts(NamedTuple):
    """A model split for training (see module docstring)."""

    graphdef: Any
    params: nnx.State
    frozen: nnx.State
    reference: nnx.State


def partition_model(model, lora_cfg) -> ModelParts:
    """Splits `model` into (graphdef, trainable params, frozen rest, reference copy).

    lora_cfg: `LoraConfig` (or None for a full fine-tune). With LoRA on, `apply_lora` must
    have run already. The reference holds COPIES of the non-LoRA trainable values, so training
    never changes it.
    """
    if lora_cfg is not None and lora_cfg.enabled:
        if not jax.tree.leaves(nnx.state(model, LoRAParam)):
            raise ValueError("lora.enabled but the model has no LoRA adapters: call apply_lora first")
    graphdef, params, frozen = nnx.split(model, trainable_filter(lora_cfg), ...)
    if not jax.tree.leaves(params):
        raise ValueError("nothing to train: the trainable filter selected no parameter")
    _, non_lora = nnx.split_state(params, LoRAParam, ...)
    reference = jax.tree.map(jnp.copy, non_lora)
    return ModelParts(graphdef, params, frozen, reference)


def with_storage_dtypes(parts: ModelParts, frozen_dtype, trainable_dtype) -> ModelParts:
    """`parts` with floating frozen weights stored in `frozen_dtype` (the compute dtype: the
    official bf16 run keeps its 7B base in bf16, half of float32's bytes) and floating
    trainable weights — and so their optimizer state — in `trainable_dtype` (float32
    masters). The reference copies keep the trainable dtype; integer/RNG leaves are untouched."""

    def cast(dtype):
        def one(x):
            return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return lambda tree: jax.tree.map(one, tree)

    return parts._replace(params=cast(trainable_dtype)(parts.params),
                          frozen=cast(frozen_dtype)(parts.frozen),
                          reference=cast(trainable_dtype)(parts.reference))


def reference_state(params: nnx.State, reference: nnx.State) -> nnx.State:
    """Trainable slots of the reference model: LoRA zeroed (x·0 = 0 exactly), the rest from
    `reference` (initial values). Merge with `frozen` to get the base model."""
    lora, _ = nnx.split_state(params, LoRAParam, ...)
    return nnx.merge_state(jax.tree.map(jnp.zeros_like, lora), reference)


def init_train_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state at step 0 (call under jit with out_shardings, or `shard` it afterwards)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key(seed),
        skipped=jnp.zeros((), jnp.int32),
    )


def trained_model(graphdef, state: TrainState, frozen: nnx.State):
    """The policy as a module (adapters still attached): `merge_lora` it before export."""
    return nnx.merge(graphdef, state.params, frozen)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_matched_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: every sub-tree with the params' structure (mu, nu, ...)
    gets the params' shardings; every other leaf (counts, scalars) is replicated."""
    target = jax.tree.structure(params)

    def is_param_tree(x) -> bool:
        return jax.tree.structure(x) == target

    def one(x):
        return param_shardings if is_param_tree(x) else _replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=is_param_tree)


def train_state_shardings(state: TrainState, mesh: Mesh, rules: dict | None = None) -> TrainState:
    """NamedSharding pytree for a (possibly abstract, from `jax.eval_shape`) `TrainState`.

    params by their logical names (`mesh.state_shardings`); optimizer state by the SAME rules
    (tree-matched to the params); step, rng, skipped replicated.
    """
    param_shardings = state_shardings(state.params, mesh, rules)
    return TrainState(
        step=_replicated(mesh),
        params=param_shardings,
        opt_state=tree_matched_shardings(state.opt_state, state.params, param_shardings, mesh),
        rng=_replicated(mesh),
        skipped=_replicated(mesh),
    )


def create_train_state(
    parts: ModelParts, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, nnx.State, nnx.State]:
    """Places everything on `mesh`: returns (train state, frozen, reference), all sharded.

    The optimizer state is created directly with its shardings (jit out_shardings), so it
    never exists unsharded on one device.
    """
    frozen = device_put_global(parts.frozen, state_shardings(parts.frozen, mesh))
    reference = device_put_global(parts.reference, state_shardings(parts.reference, mesh))
    # never alias the model's own buffers: the train state is donated at every step
    params = device_put_global(parts.params, state_shardings(parts.params, mesh), may_alias=False)
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, seed), params)
    shardings = train_state_shardings(abstract, mesh)
    init = jax.jit(lambda p: init_train_state(p, optimizer, seed), out_shardings=shardings)
    return init(params), frozen, reference
