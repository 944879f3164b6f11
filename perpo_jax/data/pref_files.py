"""Where the rows of a preference dataset are, and reading them, with pyarrow only.

`data.path` (for `data.source: hf_preference`) may be
- one `.parquet` file, or one `.arrow` file in Arrow IPC *file* format (starts with the magic
  bytes "ARROW1") or IPC *stream* format (what `datasets` writes);
- a glob of such files (`/data/rlaif_v/*.parquet`), read in sorted order;
- a `datasets.Dataset.save_to_disk` folder: `state.json` (its `_data_files` list the shards
  in order) + `dataset_info.json` + `data-0000i-of-0000N.arrow` (IPC stream format);
- a `datasets.DatasetDict.save_to_disk` folder: `dataset_dict.json` (`{"splits": [...]}`) and
  one such folder per split; `data.pref_split` picks one (default "train", or the only one);
- any other folder: its `.parquet` / `.arrow` shards (not recursive); with `data.pref_split`
  those of the split's subfolder, or else the ones named `<split>-...` / `<split>_...` (the
  Hub's `data/train-00000-of-00002.parquet`).

`datasets` itself is never imported (and never needed); nothing is downloaded.
Rows are streamed in small slices (`iter_rows`), so a file never has to fit in memory.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from perpo_jax.config import ConfigError
from perpo_jax.data.refcoco_style import DataFileError

SUFFIXES = (".parquet", ".arrow")
_IPC_FILE_MAGIC = b"ARROW1"
_SLICE_ROWS = 32  # rows turned into Python objects at a time (images make rows large)


class FileReadError(DataFileError):
    """A data file cannot be read at all (not a parquet / Arrow file, or corrupt): never
    skipped by skip_invalid, which skips rows."""


def _shards_in(folder: str) -> list[str]:
    return sorted(e.path for e in os.scandir(folder)
                  if e.is_file() and e.name.endswith(SUFFIXES))


def _saved_dataset_files(folder: str) -> list[str]:
    """The shards of a `Dataset.save_to_disk` folder, in `state.json`'s order."""
    state_path = os.path.join(folder, "state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            entries = json.load(f)["_data_files"]
        files = [os.path.join(folder, e["filename"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.path: {state_path} is not a datasets state.json with "
                          f"'_data_files' ({type(e).__name__}: {e})") from None
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"data.path: {state_path} lists {missing[0]}, which does not exist")
    if not files:
        raise ConfigError(f"data.path: {state_path} lists no data files")
    return files


def _dataset_dict_split(folder: str, split: str | None) -> str:
    """The split folder of a `DatasetDict.save_to_disk` folder."""
    path = os.path.join(folder, "dataset_dict.json")
    try:
        with open(path, encoding="utf-8") as f:
            splits = list(json.load(f)["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.path: {path} is not a datasets dataset_dict.json with "
                          f"'splits' ({type(e).__name__}: {e})") from None
    if split is None:
        if "train" in splits or len(splits) != 1:
            split = "train"
        else:
            split = splits[0]
    if split not in splits:
        raise ConfigError(f"data.pref_split: {split!r} is not a split of {folder} "
                          f"(splits: {', '.join(splits)}); set data.pref_split")
    return os.path.join(folder, split)


def _folder_files(folder: str, split: str | None) -> list[str]:
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        return _folder_files(_dataset_dict_split(folder, split), None)
    if os.path.isfile(os.path.join(folder, "state.json")):
        return _saved_dataset_files(folder)
    if split is not None and os.path.isdir(os.path.join(folder, split)):
        return _folder_files(os.path.join(folder, split), None)
    files = _shards_in(folder)
    if split is not None:
        files = [p for p in files if os.path.basename(p).startswith((f"{split}-", f"{split}_"))]
    if not files:
        which = f" of split {split!r} (data.pref_split)" if split is not None else ""
        raise ConfigError(f"data.path: {folder} holds no {' / '.join(SUFFIXES)} files{which} "
                          "and no datasets save_to_disk files (state.json / dataset_dict.json)")
    return files


def resolve_files(path: str, split: str | None = None) -> list[str]:
    """The data files `path` names (see module docstring), absolute, in reading order."""
    if os.path.isdir(path):
        return [os.path.abspath(p) for p in _folder_files(path, split)]
    if os.path.isfile(path):
        if not path.endswith(SUFFIXES):
            raise ConfigError(f"data.path: {path} is neither {' nor '.join(SUFFIXES)} (or a "
                              "datasets save_to_disk folder)")
        return [os.path.abspath(path)]
    if glob.has_magic(path):
        matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        files = [p for p in matches if p.endswith(SUFFIXES)]
        if not files:
            found = f" (it matches {len(matches)} other files)" if matches else ""
            raise ConfigError(f"data.path: no {' / '.join(SUFFIXES)} file matches "
                              f"{path}{found}")
        return [os.path.abspath(p) for p in files]
    raise ConfigError(f"data.path: {path} does not exist")


def _is_ipc_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_IPC_FILE_MAGIC)) == _IPC_FILE_MAGIC


def _arrow_batches(path: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    source = pa.memory_map(path)
    if _is_ipc_file(path):
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    reader = pa.ipc.open_stream(source)
    return reader.schema, iter(reader)


def file_schema(path: str) -> pa.Schema:
    """The Arrow schema of one data file; `FileReadError` naming the file if unreadable."""
    try:
        if path.endswith(".parquet"):
            return pq.read_schema(path)
        return _arrow_batches(path)[0]
    except (pa.ArrowException, OSError) as e:
        kind = "parquet" if path.endswith(".parquet") else "Arrow IPC (file or stream)"
        raise FileReadError(f"{path}: cannot be read as {kind}: {e}") from None


def iter_rows(path: str, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """(row index from 0, {column: Python value}) for every row of `path`, `columns` only.

    Values as `pyarrow`'s `to_pylist` gives them: struct -> dict, list -> list, binary ->
    bytes, string -> str, null -> None. A file that turns out unreadable midway raises
    `FileReadError` naming it.
    """
    row = 0
    try:
        if path.endswith(".parquet"):
            batches = pq.ParquetFile(path).iter_batches(batch_size=256, columns=columns)
        else:
            batches = (b.select(columns) for b in _arrow_batches(path)[1])
        for batch in batches:
            for start in range(0, batch.num_rows, _SLICE_ROWS):
                for values in batch.slice(start, _SLICE_ROWS).to_pylist():
                    yield row, values
                    row += 1
    except (pa.ArrowException, OSError) as e:
        raise FileReadError(f"{path}: read failed near row {row}: {e}") from None
