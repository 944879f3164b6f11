"""Layers stacked on a leading [L] axis and run with `jax.lax.scan`.

A tower's L identical blocks are ONE module whose every Variable carries a leading [L] axis
(logical name `"layers"`, never sharded: `perpo_jax.mesh.LOGICAL_RULES`). The program then
holds one traced block instead of L unrolled copies, so compile time and the compiler's host
memory do not grow with depth (7B: 32 decoder + 24 vision layers).

    blocks = stack_modules(lambda: Block(cfg, rngs=rngs), cfg.num_layers)
    x, ys = scan_layers(blocks, lambda block, x, xs: (block(x), None), x, remat=True)

`stack_modules` builds the L blocks one by one and stacks their states, so layer i gets the
same random init as the i-th of L separately built blocks (and the same RNG stream keys).
Inside `scan_layers` the body sees an ordinary single-layer module (its arrays are slice i);
RNG counters the body advances (LoRA dropout) are written back to the stacked module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS = "layers"


def _with_layer_axis(variable):
    """Prepends the stacked axis to a Variable's logical names (none: stays unnamed)."""
    meta = variable.get_metadata()
    axes = meta.get("out_sharding")
    if axes:
        variable.set_metadata(out_sharding=(LAYER_AXIS, *axes))
    return variable


def stack_modules(make: Callable[[], nnx.Module], num_layers: int) -> nnx.Module:
    """`num_layers` modules from `make()` (called in order) -> one module of the same class
    whose Variables are [num_layers, ...] stacks, logical names prefixed with "layers"."""
    if num_layers < 1:
        raise ValueError(f"a stack needs at least one layer, got {num_layers}")
    modules = [make() for _ in range(num_layers)]
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.state(m) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    jax.tree.map(_with_layer_axis, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def is_stacked(variable) -> bool:
    """True for a Variable of a stacked module (its first logical axis is "layers")."""
    axes = variable.get_metadata().get("out_sharding") if hasattr(variable, "get_metadata") else None
    return bool(axes) and axes[0] == LAYER_AXIS


def num_stacked(module: nnx.Module) -> int:
    """L of a stacked module (the leading size of its first stacked Variable)."""
    for _, var in nnx.to_flat_state(nnx.state(module)):
        if is_stacked(var):
            return int(var.get_value().shape[0])
    raise ValueError(f"{type(module).__name__} is not a stacked module")


def scan_layers(stacked: nnx.Module, body: Callable, carry: Any, xs: Any = None, *,
                remat: bool = False, start: int = 0, stop: int | None = None):
    """Runs `body(layer, carry, x) -> (carry, y)` over layers [start, stop) of `stacked`.

    `xs` is a pytree of [stop - start, ...] per-layer inputs (or None); the ys come back
    stacked [stop - start, ...]. remat: each layer's activations are recomputed in the
    backward pass (only the carry at each layer boundary is saved). RNG counters advanced
    inside (dropout) are written back to `stacked`.
    """
    graphdef, state = nnx.split(stacked)
    n = num_stacked(stacked)
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"layer range [{start}, {stop}) outside the {n} stacked layers")
    if (start, stop) != (0, n):
        # a static slice of the stack (e.g. the vision layers up to LLaVA's feature layer)
        state = jax.tree.map(lambda a: a[start:stop], state)

    def step(carry, layer_xs):
        layer_state, x = layer_xs
        layer = nnx.merge(graphdef, layer_state)
        carry, y = body(layer, carry, x)
        return carry, (y, nnx.state(layer, nnx.RngState))

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)
    carry, (ys, rng_state) = jax.lax.scan(step, carry, (state, xs))
    if jax.tree.leaves(rng_state):
        if (start, stop) != (0, n):
            full = nnx.state(stacked, nnx.RngState)
            rng_state = jax.tree.map(lambda old, new: old.at[start:stop].set(new), full, rng_state)
        nnx.update(stacked, rng_state)
    return carry, ys
