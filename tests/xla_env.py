"""XLA flags of the test processes: conftest's, and those of the subprocesses tests start.

LLVM optimisation is off for XLA:CPU: the tests' programs are tiny, so compiling them is most
of their time, while XLA's HLO passes (the programs, their FLOP counts, the TPU compiler's
figures) are unchanged. Measured here: a tiny 2-round train run compiles and runs in 14.6 s
instead of 23.2 s, its losses equal to 1e-7.
"""

CPU_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices (None: XLA's one)."""
    count = () if devices is None else (f"--xla_force_host_platform_device_count={devices}",)
    return " ".join((*count, *CPU_COMPILE_FLAGS))
