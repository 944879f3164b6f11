"""Reading and writing safetensors checkpoints without torch.

Reading: `checkpoint_index` finds every tensor's file from `model.safetensors` or a sharded
`model.safetensors.index.json` and validates every file's header (a truncated or corrupt
shard fails here, before any value is read). Values are then read one at a time from
memory-mapped files with `safetensors.safe_open(framework="numpy")`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy: safetensors reads BF16 files
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from perpo_jax.hf.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    file: str  # file name inside the checkpoint dir
    shape: tuple
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16"


def _file_header(path: str) -> dict[str, TensorInfo]:
    """Every tensor's shape/dtype from one file's header; CheckpointError if unreadable."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="numpy") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = TensorInfo(name, tuple(sl.get_shape()), sl.get_dtype())
            return out
    except Exception as e:  # safetensors raises its own error type for corrupt/truncated files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def checkpoint_index(ckpt_dir: str) -> dict[str, TensorInfo]:
    """key -> TensorInfo for every tensor of the checkpoint, all headers validated."""
    index_path = os.path.join(ckpt_dir, INDEX_FILE)
    single_path = os.path.join(ckpt_dir, SINGLE_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index_path}: unreadable index (needs a 'weight_map'): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.exists(os.path.join(ckpt_dir, fn))]
        if missing:
            lost = sorted(k for k, fn in weight_map.items() if fn in missing)
            raise CheckpointError(
                f"{index_path} names shard file(s) that do not exist: {missing}; "
                f"{len(lost)} tensor(s) missing, e.g. {lost[:5]}"
            )
    elif os.path.exists(single_path):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{ckpt_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
    infos: dict[str, TensorInfo] = {}
    for fn in files:
        infos.update(_file_header(os.path.join(ckpt_dir, fn)))
    if weight_map is not None:
        absent = sorted(k for k, fn in weight_map.items() if k not in infos or infos[k].file != fn)
        if absent:
            raise CheckpointError(
                f"{index_path}: tensor(s) listed in the index are not in their shard file: "
                + ", ".join(f"{k} ({weight_map[k]})" for k in absent[:10])
            )
    return infos


class ShardReader:
    """Keeps at most one safetensors file open; `read(key, info)` returns a numpy array."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir
        self._name = None
        self._ctx = None
        self._file = None

    def read(self, key: str, info: TensorInfo) -> np.ndarray:
        if info.file != self._name:
            self.close()
            self._ctx = safe_open(os.path.join(self.ckpt_dir, info.file), framework="numpy")
            self._file = self._ctx.__enter__()
            self._name = info.file
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {key}: {e}") from e

    def close(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        self._ctx = self._file = self._name = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """`max_shard_size` as transformers accepts it: bytes (int) or "5GB", "200MB", "1GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a string like '5GB' / '200MB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Groups keys (in order) into shards of at most `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = []
    current, used = [], 0
    for key, n in sizes:
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += n
    if current:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shard(path: str, tensors: dict[str, np.ndarray]):
    save_file(tensors, path, metadata={"format": "pt"})


def write_index(path: str, weight_map: dict[str, str], total_bytes: int):
    with open(path, "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
