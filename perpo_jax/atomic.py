"""Write-then-rename: nothing this package writes is ever seen half-written.

    with atomic_dir("out/hf") as tmp:        # tmp is a fresh dir next to out/hf
        write_everything_into(tmp)           # an exception removes tmp, out/hf untouched
    with atomic_file("out/report.json") as tmp_path:
        write(tmp_path)

For a store URL (gs://, no rename there) the temp is local and `perpo_jax.storage` uploads it
on success: a file as one object (appears whole), a dir file by file with its commit marker
written last (`storage.COMMIT_MARKER`; readers refuse a URL dir without it).

A log that grows (`AppendFile`) is appended to locally and rewritten whole on a store.

The temp lives in the target's parent so the final rename stays on one filesystem. What
appears at the target has the modes a plain `mkdir` / `open(..., "w")` would give it (the
umask's; a replaced file keeps its mode), not the private 0700 / 0600 of `tempfile` or of
writers that go through a temp file themselves (safetensors' `save_file`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

from perpo_jax import storage
from perpo_jax.storage import is_url


def current_umask() -> int:
    """The process umask, read from /proc where possible: `os.umask` can only be read by
    setting it, which would briefly change the modes of files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: str) -> int:
    """The mode `open(path, "w")` would leave: an existing file's own, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _share_tree(root: str) -> None:
    """Gives `root` and everything under it the umask's modes (executables stay executable)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                full = 0o777 if os.stat(path).st_mode & 0o111 else 0o666
                os.chmod(path, full & ~mask)


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
    """Yields a temp dir; on success it replaces `out_dir` (an existing one is swapped out
    first and removed after, so a reader sees the old or the new dir, never a mix). For a URL:
    a local temp dir, uploaded by `storage.commit_tree` (marker last) on success."""
    if is_url(out_dir):
        tmp = tempfile.mkdtemp(prefix="perpo_jax-upload-")
        try:
            yield tmp
            storage.commit_tree(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        _share_tree(tmp)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a temp file path (same suffix as `path`); on success it replaces `path` (a URL:
    uploaded as one object)."""
    if is_url(path):
        fd, tmp = tempfile.mkstemp(prefix="perpo_jax-upload-", suffix=os.path.splitext(path)[1])
        os.close(fd)
        try:
            yield tmp
            storage.upload_file(tmp, path)
        finally:
            os.remove(tmp)
        return
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-",
                               suffix=os.path.splitext(path)[1], dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AppendFile:
    """A file that is appended to (logs). Local: `open(..., "ab")`. URL (no append in a store):
    the contents are kept here and the whole object is rewritten on each append — a kill
    leaves the previous whole version, never a torn line."""

    def __init__(self, path: str):
        self.path = path
        self._cache: bytes | None = None  # URL only: the object's bytes as last seen/written

    def read(self) -> bytes:
        if self._cache is not None:
            return self._cache
        if not storage.exists(self.path):
            return b""
        data = storage.read_bytes(self.path)
        if is_url(self.path):
            self._cache = data
        return data

    def exists(self) -> bool:
        return self._cache is not None or storage.exists(self.path)

    def append(self, data: bytes) -> None:
        if not is_url(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(data)
            return
        self.rewrite(self.read() + data)

    def rewrite(self, data: bytes) -> None:
        """Replaces the contents whole (locally: write-then-rename)."""
        if is_url(self.path):
            storage.write_object(self.path, data)
            self._cache = data
            return
        with atomic_file(self.path) as tmp, open(tmp, "wb") as f:
            f.write(data)
