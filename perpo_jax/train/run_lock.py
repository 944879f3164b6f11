"""One training process per run dir: `train.out_dir/run.lock`.

    with RunLock(cfg.train.out_dir):     # RunDirInUse when another live process holds it
        ...train...

Two `train` runs into one out_dir would interleave metrics.jsonl rows and race each other's
checkpoints, both "succeeding". The lock is an exclusive `flock` on `run.lock` holding the
holder's pid and host: the kernel drops it when its process dies (even by SIGKILL), so a lock
file left by a dead run is stale by construction and taken over (said in `stale_pid`); a live
holder is refused with its pid. A gs:// run dir has no locks (not enforced there). In a
multi-process run each process locks its own file (`run.lock.<process>`), so the hosts of one
run, sharing a dir or not, never block each other while a second run is refused on each.

Taking the lock is also the run dir's writability check: a read-only or full disk fails
here, before any dataset, model or compilation (`write_checks.OutputWriteError`).
"""
from __future__ import annotations

import fcntl
import os
import socket

from perpo_jax import storage
from perpo_jax.write_checks import as_write_error

LOCK_NAME = "run.lock"


class RunDirInUse(RuntimeError):
    """Another live process is training into the same run dir."""


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode("utf-8", "replace").strip()


class RunLock:
    """Context manager holding `<out_dir>/run.lock` (see the module docstring).

    process_index: this process in a multi-process run (0 in a single-process one).
    """

    def __init__(self, out_dir: str, *, process_index: int = 0):
        self.out_dir = out_dir
        name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
        self.path = None if storage.is_url(out_dir) else os.path.join(out_dir, name)
        self.stale_pid: str | None = None  # holder named by a stale lock file we took over
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path is None:
            return self
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise as_write_error(err, f"train.out_dir {self.out_dir}") or err from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or "another process"
            os.close(fd)
            raise RunDirInUse(f"train.out_dir {self.out_dir} is in use by {holder} (its "
                              f"{self.path}): wait for that run, stop it, or choose another "
                              "train.out_dir") from None
        # the file may have been removed by its releasing holder between our open and flock
        try:
            same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:
            os.close(fd)
            return self.acquire()
        previous = _read_holder(fd)
        if previous:
            self.stale_pid = previous
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as err:
            os.close(fd)
            raise as_write_error(err, f"train.out_dir {self.out_dir}") or err from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # before unlocking: a waiter then finds no file to lock
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
