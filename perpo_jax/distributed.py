"""Starting JAX's multi-process runtime: explicitly, automatically on a TPU VM, or never.

    initialize_distributed(coordinator="10.0.0.2:1234", num_processes=2, process_id=0)
    initialize_distributed()      # auto: on a TPU VM or with PERPO_JAX_DISTRIBUTED=1

- `coordinator` given: `jax.distributed.initialize(coordinator, num_processes, process_id)`
  (all three needed); on CPU the cross-process collectives go through gloo
  (`jax_cpu_collectives_implementation`), which works with the pinned jax.
- otherwise, `PERPO_JAX_DISTRIBUTED=1`, or a TPU VM (`TPU_WORKER_HOSTNAMES` /
  `TPU_WORKER_ID` in the environment, or /dev/accel0 / /dev/vfio devices):
  `jax.distributed.initialize()` discovers the slice itself.
- `PERPO_JAX_DISTRIBUTED=0` or none of the above: nothing (one process).

Must run before anything touches a JAX backend; a second call is a no-op.

`process_zero_first(build)` runs a host-side build (dataset preparation) on process 0 first,
the others after a barrier: with a shared dir they find process 0's files and reuse them;
with per-host local dirs they build the same files themselves (builds are deterministic).
"""
from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

ENV_FLAG = "PERPO_JAX_DISTRIBUTED"
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")
# A pod-sized dataset build can take hours on process 0 while the others wait.
BUILD_BARRIER_TIMEOUT_S = 24 * 3600


def on_tpu_vm() -> bool:
    """A Cloud TPU VM host (its runtime sets the worker variables; the chips are devices)."""
    return (any(os.environ.get(k) for k in _TPU_ENV) or os.path.exists("/dev/accel0")
            or bool(glob.glob("/dev/vfio/[0-9]*")))


def wants_auto() -> bool:
    """Whether `initialize_distributed()` without a coordinator starts the runtime."""
    flag = os.environ.get(ENV_FLAG)
    if flag is not None and flag.strip() != "":
        return flag.strip() == "1"
    return on_tpu_vm()


def check_args(coordinator: str | None, num_processes: int | None,
               process_id: int | None) -> None:
    """ValueError naming the flag unless the explicit arguments are all given and coherent."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together: "
                         "give all three or none")
    if coordinator is None:
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    if num_processes < 1:
        raise ValueError(f"--num-processes {num_processes}: must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id}: must be in [0, {num_processes})")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts jax.distributed as the module docstring says; True when it was started."""
    check_args(coordinator, num_processes, process_id)
    import jax

    if jax.distributed.is_initialized():
        return False
    if coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
        return True
    if wants_auto():
        jax.distributed.initialize()
        return True
    return False


def process_zero_first(build: Callable[[], T], name: str,
                       timeout_s: int = BUILD_BARRIER_TIMEOUT_S) -> T:
    """`build()` on process 0, then on every other process after a barrier named `name`.

    One process: just `build()`. Process 0's failure reaches the others as a barrier
    timeout, so it is re-raised there first; the barrier is the distributed runtime's
    (orbax's `sync_global_processes`), which waits up to `timeout_s` seconds.
    """
    import jax  # here, like initialize_distributed: the CLI checks flags before loading jax
    from orbax.checkpoint import multihost

    if jax.process_count() == 1:
        return build()
    result = build() if jax.process_index() == 0 else None
    multihost.sync_global_processes(f"perpo_jax:{name}", timeout=timeout_s)
    return result if jax.process_index() == 0 else build()
