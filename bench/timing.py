"""How the benchmarks in bench/ time their variants and say where they ran.

- `time_interleaved`: every variant called in turn, round after round, so load from other
  processes on a shared machine falls on all of them alike (report same-run ratios);
- `best_time`: the fastest of `repeats` calls of one function;
- `machine_info`: platform, CPU cores (all / usable by this process) and the versions of the
  libraries the benchmark has imported, with jax's backend and device, torch's threads.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable

# libraries whose version a report names when the benchmark has imported them
_LIBRARIES = ("numpy", "jax", "flax", "optax", "torch", "transformers", "rapidfuzz")


def log(msg: str) -> None:
    """Progress on stderr (stdout is the JSON report)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def time_interleaved(runners: dict[str, Callable[[], object]], repeats: int) -> dict:
    """One untimed warm-up call each, then `repeats` rounds calling every runner in turn.

    Returns name -> {"first_s" (the warm-up, compiles included), "median_s", "min_s"}.
    """
    stats = {}
    for name, fn in runners.items():
        log(f"warm-up {name}")
        start = time.perf_counter()
        fn()
        stats[name] = {"first_s": time.perf_counter() - start, "times": []}
    for i in range(repeats):
        log(f"round {i + 1}/{repeats}")
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            stats[name]["times"].append(time.perf_counter() - start)
    return {name: {"first_s": round(st["first_s"], 4),
                   "median_s": round(statistics.median(st["times"]), 4),
                   "min_s": round(min(st["times"]), 4)} for name, st in stats.items()}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info() -> dict:
    """Where a benchmark ran: platform, cores, and the libraries it imported (never imports
    one itself, so a numpy-only benchmark reports no jax)."""
    info = {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpu_cores_usable": cpu_cores()}
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "unknown")
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        info.update(jax_backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                    num_devices=jax.device_count())
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info
