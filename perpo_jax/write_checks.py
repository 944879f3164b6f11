"""Writes that cannot happen, said in one line: a full disk, a read-only or forbidden dir.

    check_writable("runs/x", "train.out_dir")       # before the work: probe the nearest dir
    raise as_write_error(err, "checkpoint runs/x/checkpoints") or err   # after a failed write

`OutputWriteError` is an OSError (same errno) whose message names what was being written,
e.g. "no space left on device writing checkpoint runs/x/checkpoints". tensorstore (orbax)
reports such failures as a ValueError carrying the OS text; `as_write_error` reads both.
Light (no jax): the CLI imports it before parsing.
"""
from __future__ import annotations

import errno
import os
import tempfile

from perpo_jax import storage

# errno -> (words of the OS message tensorstore and friends embed, how we say it)
_WRITE_ERRNOS = {
    errno.ENOSPC: ("No space left on device", "no space left on device writing {what}"),
    errno.EDQUOT: ("Disk quota exceeded", "disk quota exceeded writing {what}"),
    errno.EROFS: ("Read-only file system", "read-only file system: cannot write {what}"),
    errno.EACCES: ("Permission denied", "permission denied writing {what}"),
    errno.EPERM: ("Operation not permitted", "operation not permitted writing {what}"),
}
WRITE_ERRNOS = frozenset(_WRITE_ERRNOS)
# Below this many free bytes a dir counts as full before anything is written (a probe file
# of 0 bytes would still be created on a full disk).
MIN_FREE_BYTES = 1 << 20


class OutputWriteError(OSError):
    """A write failed (or would) for lack of space or permission; the message names it."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_errno(err: BaseException) -> int | None:
    """The errno of a failed write (ENOSPC, EROFS, ...) if `err` is one, else None; reads
    OSError.errno and the OS text inside other errors (tensorstore's ValueError)."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return err.errno
    text = str(err)
    for code, (words, _) in _WRITE_ERRNOS.items():
        if words in text:
            return code
    return None


def as_write_error(err: BaseException, what: str) -> OutputWriteError | None:
    """`err` as a one-line OutputWriteError about writing `what`, or None when `err` is not
    a failed write (then the caller re-raises it unchanged)."""
    if isinstance(err, OutputWriteError):
        return err
    code = write_errno(err)
    if code is None:
        return None
    return OutputWriteError(code, _WRITE_ERRNOS[code][1].format(what=what))


def _nearest_dir(path: str) -> str:
    """`path` itself when it is a dir, else its nearest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _create_probe(directory: str) -> None:
    """Creates and removes an empty file in `directory` (raises the OSError a write would)."""
    fd, probe = tempfile.mkstemp(prefix=".perpo_jax-write-check-", dir=directory)
    os.close(fd)
    os.remove(probe)


def check_writable(path: str, what: str) -> None:
    """Raises OutputWriteError unless files can be created where `path` is (or would be
    made) and its filesystem has MIN_FREE_BYTES free. A URL is not probed (its bucket's
    permissions are checked by the first write)."""
    if storage.is_url(path):
        return
    directory = _nearest_dir(path)
    try:
        _create_probe(directory)
        free = os.statvfs(directory)
    except OSError as err:
        raise as_write_error(err, f"{what} {path}") or OutputWriteError(
            err.errno or errno.EIO, f"cannot write {what} {path}: {err.strerror or err}") from None
    if free.f_bavail * free.f_frsize < MIN_FREE_BYTES:
        raise OutputWriteError(errno.ENOSPC, f"no space left on device writing {what} {path} "
                               f"({free.f_bavail * free.f_frsize} bytes free in {directory})")
