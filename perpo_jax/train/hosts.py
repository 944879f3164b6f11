"""Host ⇄ device for a multi-host run: every host holds its own rows of a list batch.

Rows of host h are rows [h·n, (h+1)·n) of the global batch (`jax.make_array_from_process_
local_data` lays them out that way over the (data, fsdp) axes). With one process all of this
is the identity, which is what the CPU tests exercise.
"""

from __future__ import annotations

import jax
import numpy as np

from perpo_jax.mesh import batch_sharding


def to_global(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This host's rows [n, ...] → global arrays [n · hosts, ...] sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh, 1)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def local_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded (or replicated) global array, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    n = full.shape[0] // jax.process_count()
    return full[jax.process_index() * n:(jax.process_index() + 1) * n]


def global_max(values: dict[str, int]) -> dict[str, int]:
    """Element-wise max of small ints over hosts (list counts, prompt widths), so every host
    makes the same number of jitted calls with the same shapes."""
    if jax.process_count() == 1:
        return dict(values)
    from jax.experimental import multihost_utils

    keys = sorted(values)
    mine = np.asarray([values[k] for k in keys], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine))
    return {k: int(v) for k, v in zip(keys, every.reshape(-1, len(keys)).max(axis=0))}
