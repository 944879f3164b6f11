"""The CLI's path edge: paths made absolute once, the `--out` guard, the `--checkpoint` check.

`--checkpoint`, `--out`, `--from-hf` (`PATH_ARGS`) and the config's path keys (`PATH_KEYS`) are
made absolute against the working directory before anything runs, so a relative path means
the same to orbax and TFDS, and in the config saved with a run. A gs:// URL is kept as written
and checked in its bucket (`perpo_jax.storage`).

`check_out_dir` refuses a non-empty `--out` unless `--overwrite`, and an `--out` that is,
contains or lies inside one of the `protected_paths` (the checkpoint, the run and checkpoint
dirs, the data, the base model) even then.
"""
from __future__ import annotations

import os

from perpo_jax import storage
from perpo_jax.config import Config

# Config keys holding paths, made absolute against the working directory by `resolve_paths`.
PATH_KEYS = ("train.out_dir", "checkpoint.dir", "data.data_dir", "data.path", "data.image_dir",
             "data.tokenizer", "model.hf_path", "lora.init_from")
# Command-line arguments holding paths (same treatment).
PATH_ARGS = ("checkpoint", "out", "from_hf")


class OutDirError(ValueError):
    """An `--out` that would overwrite something without --overwrite, or destroy an input."""


def absolute(path: str) -> str:
    return path if storage.is_url(path) else os.path.abspath(os.path.expanduser(path))


def resolve_paths(cfg: Config) -> Config:
    """`cfg` with every `PATH_KEYS` value made absolute against the working directory."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            setattr(getattr(cfg, section), name, absolute(value))
    return cfg


def resolve_args(args) -> None:
    """Makes the `PATH_ARGS` absolute; a missing --checkpoint / --from-hf dir is an error
    here, before any heavy import or work."""
    for name in PATH_ARGS:
        if getattr(args, name, None):
            setattr(args, name, absolute(getattr(args, name)))
    for name in ("checkpoint", "from_hf"):
        path = getattr(args, name, None)
        if path is not None and not storage.isdir(path):  # gs:// too
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such directory")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_out_dir(out: str, protected: dict[str, str | None], overwrite: bool) -> None:
    """Refuses (OutDirError) an `--out` that is, contains or lies inside a `protected` path
    ({what: path}), whatever `overwrite` says, and a non-empty one unless `overwrite`.
    A gs:// URL is compared as written (no realpath) and checked in its bucket."""
    def real_path(path: str) -> str:
        return path.rstrip("/") if storage.is_url(path) else os.path.realpath(path)

    real = real_path(out)
    for what, path in protected.items():
        if path is None:
            continue
        guarded = real_path(path)
        relation = ("is" if real == guarded else "contains" if _within(guarded, real)
                    else "lies inside" if _within(real, guarded) else None)
        if relation is not None:
            raise OutDirError(f"--out {out} {relation} the {what} {path}: choose a directory "
                              "outside it (refused even with --overwrite)")
    if storage.is_url(out):  # a prefix with objects under it, or an object of that name
        occupied = storage.isdir(out) or storage.isfile(out)
    else:
        occupied = os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out))
    if occupied:
        if not overwrite:
            raise OutDirError(f"--out {out} exists and is not an empty directory: pass "
                              "--overwrite to replace it")


def protected_paths(cfg: Config, **inputs: str | None) -> dict[str, str | None]:
    """What an --out must never touch: the command's inputs + the config's run and data."""
    return {**inputs,
            "run dir (train.out_dir)": cfg.train.out_dir,
            "checkpoint dir (checkpoint.dir)": cfg.checkpoint.dir,
            "data dir (data.data_dir)": cfg.data.data_dir,
            "data file (data.path)": cfg.data.path,
            "image dir (data.image_dir)": cfg.data.image_dir,
            "base model (model.hf_path)": cfg.model.hf_path,
            "PEFT adapter (lora.init_from)": cfg.lora.init_from}


def check_checkpoint(path: str) -> None:
    """One-line error unless `path` holds a training checkpoint (root or step dir) or a
    converted params checkpoint; runs before any dataset, directory or orbax thread exists
    (`resolve_args` has already refused a missing dir)."""
    # imported here, not at the top: they pull in orbax / jax, and the CLI imports this
    # module before parsing, so `--help` stays fast
    from perpo_jax.checkpoint import STATE_ITEM
    from perpo_jax.hf import CheckpointError
    from perpo_jax.restore import is_params_checkpoint

    steps = [n for n in storage.listdir(path)
             if n.isdigit() and storage.isdir(os.path.join(path, n, STATE_ITEM))]
    if not (steps or storage.isdir(os.path.join(path, STATE_ITEM)) or is_params_checkpoint(path)):
        raise CheckpointError(f"--checkpoint {path}: not a checkpoint (no finalised step "
                              f"<N>/{STATE_ITEM}, no {STATE_ITEM}/, no params/ + config.json)")
