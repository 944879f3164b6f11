"""Device mesh and the ONE table mapping logical axis names to mesh axes.

Every parameter in `perpo_jax.models` is created with logical axis names
(`nnx.Param(..., out_sharding=("embed", "mlp"), eager_sharding=False)`); this module
turns those names into `NamedSharding`s for a concrete mesh with axes
(`data`, `fsdp`, `tensor`). A dimension whose size does not divide the mesh axes it maps
to (e.g. 9 query heads on tensor=2) is replicated instead of failing, as real
checkpoints need.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations / batch
    "batch": ("data", "fsdp"),
    "length": None,
    "candidates": None,
    # language model
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
    # vision tower (kept separate so a user can shard the tower differently)
    "vision_embed": "fsdp",
    "vision_mlp": "tensor",
    "vision_heads": "tensor",
    "vision_head_dim": None,
    "patch": None,
    "channels": None,
    "positions": None,
    # LoRA: the rank dimension takes fsdp where the other dimension did not (a mesh axis is
    # used once per array), so under an fsdp-only mesh (the official ZeRO-3 recipe) a LoRA
    # `b` [rank, out] and `down_proj`'s `a` [mlp, rank] are split across chips too, not
    # replicated on each.
    "lora_rank": "fsdp",
}


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a `Mesh` with axes (data, fsdp, tensor); one entry of `shape` may be -1.

    Axes are `AxisType.Auto` so `with_sharding_constraint` and jit shardings work as
    classic pjit (recent JAX defaults `jax.make_mesh` to Explicit axes).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape may contain at most one -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape entries must be positive or -1, got {shape}")
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh.shape {shape} does not divide the {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh.shape {shape} has {math.prod(shape)} slots but there are {len(devices)} devices"
        )
    dev_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(name: str | None, rules: dict) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise KeyError(f"logical axis {name!r} has no entry in the sharding rules table")
    target = rules[name]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: dict | None = None,
) -> PartitionSpec:
    """Maps logical names of one array to a `PartitionSpec` valid for `shape` on `mesh`.

    A mesh axis is used at most once per array (first dimension wins); a dimension that
    the product of its mesh axes does not divide is replicated.
    """
    rules = LOGICAL_RULES if rules is None else rules
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(logical_axes, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % n:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_sharding(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def variable_axes(variable: Any) -> tuple[str | None, ...] | None:
    """Logical axis names stored on an `nnx.Variable` (or its state), or None."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    axes = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(axes) if axes is not None else None


def state_shardings(state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
    """Pytree of `NamedSharding` matching an `nnx.State`: logical names → mesh axes.

    Variables without logical names (RNG keys, counters, scalars) are replicated.
    """
    from flax import nnx

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        axes = variable_axes(var)
        shape = getattr(value, "shape", ())
        if axes is None or len(axes) != len(shape):
            return NamedSharding(mesh, PartitionSpec())
        return logical_sharding(axes, shape, mesh, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def traced_under_mesh(fn, mesh: Mesh | None):
    """fn traced with `mesh` as the abstract mesh (None: fn itself). Fused attention kernels
    (models/attention_kernels.py) read from it the target devices' platform (a CPU host may
    compile for TPU) and the axes their shard_map splits over."""
    if mesh is None:
        return fn

    @functools.wraps(fn)  # keeps fn's signature: XLA's buffer names say `frozen[...]`, not args[1]
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    # a functools.partial has no __name__ to copy: name the program after the function it binds
    traced.__name__ = getattr(fn, "__name__", None) or getattr(
        getattr(fn, "func", None), "__name__", "traced")
    return traced


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays: leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def device_put_global(tree, shardings, *, may_alias: bool | None = None):
    """`jax.device_put(tree, shardings)` that also works when `shardings` span other
    processes' devices (a multi-process mesh, where `jax.device_put` refuses): every process
    holds the same full values (a model built from the same seed or checkpoint) and places
    its addressable shards. `shardings` is a tree of `Sharding`s whose leaves stand for
    sub-trees of `tree` (e.g. `mesh.state_shardings` of an nnx.State: one per Variable).
    may_alias: as jax.device_put's (single process; a multi-process put always copies)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings, may_alias=may_alias)

    def global_array(value, sharding):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(value))
            out = jax.make_array_from_callback(data.shape, sharding, lambda i: data[i])
            return jax.random.wrap_key_data(out, impl=jax.random.key_impl(value))
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    def one(sharding, sub):
        if isinstance(sub, nnx.Variable):
            return sub.replace(global_array(sub.get_value(), sharding))
        return jax.tree.map(lambda v: global_array(v, sharding), sub)

    return jax.tree.map(one, shardings, tree,
                        is_leaf=lambda n: isinstance(n, jax.sharding.Sharding))
