"""Write-then-rename: nothing this package writes is ever seen half-written.

    with atomic_dir("out/hf") as tmp:        # tmp is a fresh dir next to out/hf
        write_everything_into(tmp)           # an exception removes tmp, out/hf untouched
    with atomic_file("out/report.json") as tmp_path:
        write(tmp_path)

The temp lives in the target's parent so the final rename stays on one filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
    """Yields a temp dir; on success it replaces `out_dir` (an existing one is swapped out
    first and removed after, so a reader sees the old or the new dir, never a mix)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
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
    """Yields a temp file path (same suffix as `path`); on success it replaces `path`."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-",
                               suffix=os.path.splitext(path)[1], dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
