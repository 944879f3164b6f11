"""Local paths and store URLs (`gs://bucket/dir`) behind one small API.

Local paths go to `os`; URLs to fsspec (gcsfs for gs://, the backend etils.epath and orbax use
too; install the `gcs` extra). A store has no rename, so the write-then-rename of
`perpo_jax.atomic` (which builds on this module; this one imports nothing of the project)
becomes, for a URL:

- a FILE is written locally and uploaded as one object: a GCS object appears whole or not at
  all, so a file needs no marker;
- a DIRECTORY (an HF export, a params checkpoint) is written locally, uploaded file by file,
  and `COMMIT_MARKER` is written LAST (an old dir's marker is removed FIRST). A URL dir without
  the marker is absent or its write was interrupted: `require_committed` refuses it.

Orbax checkpoints are not ours: on gs:// orbax marks a finalised step with its own
`commit_success.txt`, and `Checkpointer` only lists such steps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

COMMIT_MARKER = "_COMMITTED"


def is_url(path) -> bool:
    """A store URL such as gs://bucket/dir (kept as given: never made absolute or realpath'd)."""
    return "://" in str(path)


def _fs(url: str):
    """(fsspec filesystem, path inside it) of a URL."""
    try:
        import fsspec
        return fsspec.core.url_to_fs(str(url))
    except ImportError as e:  # fsspec without gcsfs raises ImportError naming the protocol
        raise ImportError(f"{url}: writing/reading store URLs needs fsspec + gcsfs "
                          f"(pip install 'perpo-jax[gcs]'): {e}") from e


def _fresh(url: str):
    """`_fs(url)` with gcsfs' listing cache of `url` dropped (another host may have written)."""
    fs, path = _fs(url)
    fs.invalidate_cache(path)
    return fs, path


def join(path: str, *parts: str) -> str:
    return os.path.join(str(path), *parts)  # '/'-joined, also for URLs


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fresh(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    """Local: a directory. URL: a prefix holding at least one object."""
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fresh(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = _fresh(path)
    return fs.isfile(p)


def listdir(path: str) -> list[str]:
    """Names directly under `path` ([] for a URL prefix with nothing under it)."""
    if not is_url(path):
        return os.listdir(path)
    fs, p = _fresh(path)
    if not fs.isdir(p):
        return []
    return sorted({os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)})


def makedirs(path: str) -> None:
    """Local: `os.makedirs(exist_ok=True)`. A store has no directories: nothing to do."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def write_object(url: str, data: bytes) -> None:
    """One whole object (replaced whole: readers see the old or the new bytes)."""
    fs, p = _fs(url)
    fs.pipe_file(p, data)


def upload_file(local: str, url: str) -> None:
    fs, p = _fs(url)
    fs.put_file(local, p)


def remove_tree(url: str) -> None:
    fs, p = _fresh(url)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def is_committed(path: str) -> bool:
    """Local: the dir exists (it was renamed into place whole). URL: its marker exists."""
    if not is_url(path):
        return os.path.isdir(path)
    return exists(join(path, COMMIT_MARKER))


def require_committed(path: str, what: str = "directory") -> None:
    """FileNotFoundError naming `path` unless `is_committed(path)`."""
    if is_committed(path):
        return
    if is_url(path) and isdir(path):
        raise FileNotFoundError(
            f"{what} {path} is incomplete: it has no {COMMIT_MARKER} marker (its write was "
            "interrupted or is still running); write it again")
    raise FileNotFoundError(f"{what} {path} does not exist")


def commit_tree(local_dir: str, url: str) -> None:
    """Uploads `local_dir` to `url` (which is replaced) and writes `COMMIT_MARKER` last."""
    fs, root = _fresh(url)
    marker = join(root, COMMIT_MARKER)
    if fs.exists(marker):
        fs.rm_file(marker)  # from here on readers see an incomplete dir, never a mix
    if fs.exists(root):
        fs.rm(root, recursive=True)
    for parent, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(parent, name)
            if os.path.islink(src) and not os.path.exists(src):
                continue
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            upload_file(src, f"{url.rstrip('/')}/{rel}")
    write_object(join(url, COMMIT_MARKER), b"")
    fs.invalidate_cache(root)


@contextlib.contextmanager
def local_copy(path: str, what: str = "directory") -> Iterator[str]:
    """`path` itself when local; for a URL, a committed dir downloaded to a temp dir
    (removed after) — for readers that need files on disk (safetensors, transformers)."""
    if not is_url(path):
        yield path
        return
    require_committed(path, what)
    fs, p = _fs(path)
    tmp = tempfile.mkdtemp(prefix="perpo_jax-download-")
    try:
        fs.get(p.rstrip("/") + "/", tmp + "/", recursive=True)
        marker = os.path.join(tmp, COMMIT_MARKER)
        if os.path.exists(marker):
            os.remove(marker)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
