"""perpo_jax.host_memory: after keep_host_memory(), a freed big block is reused, so touching
a new one of the same size page-faults almost nothing (glibc's default maps it afresh).
Run in child processes: the setting lasts for a process's life."""
import subprocess
import sys

import pytest

# malloc/memset/free through ctypes, as XLA's buffers are (numpy would madvise huge pages)
CHILD = r"""
import ctypes, resource, sys
from perpo_jax.host_memory import keep_host_memory
kept = keep_host_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20

def touch():  # 256 MiB allocated, written, freed
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)

touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()  # the same size again
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(int(kept), faults / (size // resource.getpagesize()))
"""


def faults_per_page(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return bool(int(out[0])), float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_keep_host_memory_reuses_freed_blocks():
    kept, kept_faults = faults_per_page("keep")
    assert kept is True
    assert kept_faults < 0.05  # the second 256 MiB reused the first's pages
    default_kept, default_faults = faults_per_page("default")
    assert default_kept is False
    assert default_faults > 0.5  # glibc's default: a fresh mmap, every page faulted in again
