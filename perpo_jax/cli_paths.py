"""The CLI's path edge: paths made absolute once, the ONE `--out` guard, the `--checkpoint` check.

`--config`, `--checkpoint`, `--out`, `--from-hf`, `--pope-dir`, `--image-dir` (`PATH_ARGS`)
and the config's path keys (`PATH_KEYS`) are made absolute against the working directory,
`~` expanded, before anything runs, so a relative path means the same to orbax and TFDS, and
in the config saved with a run. A gs:// URL is kept as written and checked in its bucket
(`perpo_jax.storage`).

`check_out_dir` is the guard every command that writes an `--out` goes through (export,
convert, sample, pope, eval, demo): refused, whatever `--overwrite` says, is an `--out` that

- is or contains the working directory or $HOME;
- is, contains or lies inside one of the `protected_paths`: the command's inputs (the
  checkpoint, --from-hf, POPE files), the checkpoint dir, the run's own files (checkpoints/,
  lists/, metrics.jsonl, tb/, ...), the data (data.data_dir, data.path, data.image_dir,
  data.tokenizer) and the base model (model.hf_path);
- is or contains the run dir (train.out_dir) -- a fresh dir INSIDE a run is fine (the demo
  puts `perpo_hf/` there);

and refused unless `--overwrite`: a non-empty `--out` dir (an existing `--out` file), so
nothing a user owns is replaced unasked. Last, it checks that `--out` can be written
(`write_checks.check_writable`), so a read-only or full disk fails before the work.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from perpo_jax import storage
from perpo_jax.config import Config
from perpo_jax.write_checks import check_writable

# Config keys holding paths, made absolute against the working directory by `resolve_paths`.
PATH_KEYS = ("train.out_dir", "checkpoint.dir", "data.data_dir", "data.path", "data.image_dir",
             "data.tokenizer", "model.hf_path", "lora.init_from")
# Command-line arguments holding paths (same treatment).
PATH_ARGS = ("config", "checkpoint", "out", "from_hf", "pope_dir", "image_dir")
# What `train` writes into train.out_dir besides checkpoints/ (perpo_jax.train.loop / run_log /
# run_lock): an --out must not be, contain or lie inside any of them.
RUN_ITEMS = ("lists", "tb", "metrics.jsonl", "curves.png", "run.lock")


class OutDirError(ValueError):
    """An `--out` that would overwrite something without --overwrite, or destroy an input."""


# What a `Guarded` path allows inside it (being or containing it is refused either way)
INSIDE_REFUSED = "refused"  # nothing (the data, a checkpoint, the base model)
INSIDE_ALLOWED = "allowed"  # anything (a fresh subdir of a run dir)
INSIDE_NEW_ONLY = "new only"  # a path that does not exist yet (a report beside POPE files)


class Guarded(NamedTuple):
    """A path an `--out` must not touch; `inside` says what an `--out` inside it may be."""

    what: str
    path: str | None
    inside: str = INSIDE_REFUSED


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


def _real_path(path: str) -> str:
    return path.rstrip("/") if storage.is_url(path) else os.path.realpath(path)


def _relation(out: str, guarded: str, inside: str = INSIDE_REFUSED) -> str | None:
    """How real path `out` touches real path `guarded`: "is", "contains", "lies inside"
    (None: not at all, or inside where `inside` allows it)."""
    if out == guarded:
        return "is"
    if _within(guarded, out):
        return "contains"
    if _within(out, guarded) and (inside == INSIDE_REFUSED or (
            inside == INSIDE_NEW_ONLY and storage.exists(out))):
        return "lies inside"
    return None


def _as_guarded(protected: Mapping[str, str | None] | Iterable[Guarded]) -> list[Guarded]:
    if isinstance(protected, Mapping):
        return [Guarded(what, path) for what, path in protected.items()]
    return list(protected)


def leftovers(out: str, kept: Sequence[str] = ()) -> list[str]:
    """Paths under local dir `out` that are not `kept` (nor on the way to a kept path)."""
    kept_real = [_real_path(k) for k in kept]
    found = []

    def visit(directory: str) -> None:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            real = _real_path(path)
            if any(real == k for k in kept_real):
                continue
            if os.path.isdir(path) and not os.path.islink(path) and any(
                    _within(k, real) for k in kept_real):
                visit(path)
            else:
                found.append(path)

    visit(out)
    return found


def clear_out(out: str, kept: Sequence[str] = ()) -> None:
    """Removes everything under local dir `out` except `kept` (after `check_out_dir`)."""
    for path in leftovers(out, kept):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _refuse_home_and_cwd(out: str, real: str) -> None:
    for what, path in (("working directory", os.getcwd()), ("home directory ($HOME)",
                                                           os.path.expanduser("~"))):
        relation = _relation(real, os.path.realpath(path), INSIDE_ALLOWED)
        if relation is not None:
            raise OutDirError(f"--out {out} {relation} the {what} {path}: choose a new "
                              "directory for the output (refused even with --overwrite)")


def check_out_dir(out: str, protected: Mapping[str, str | None] | Iterable[Guarded],
                  overwrite: bool, *, kind: str = "dir", kept: Sequence[str] = ()) -> None:
    """The `--out` guard (see the module docstring). protected: `Guarded` paths (or
    {what: path}, each guarded inside too); kind: "dir" (replaced or filled as a whole) or
    "file"; kept: paths inside a dir `--out` that stay (the demo's dataset), so they neither
    make it non-empty nor are removed by `clear_out`. A URL is compared as written (no
    realpath) and checked in its bucket."""
    real = _real_path(out)
    if not storage.is_url(out):
        _refuse_home_and_cwd(out, real)
    for g in _as_guarded(protected):
        if g.path is None:
            continue
        relation = _relation(real, _real_path(g.path), g.inside)
        if relation is not None:
            raise OutDirError(f"--out {out} {relation} the {g.what} {g.path}: choose a path "
                              "outside it (refused even with --overwrite)")
    if kind == "file":
        if storage.isdir(out):
            raise OutDirError(f"--out {out} is a directory: give the file to write")
        if storage.isfile(out) and not overwrite:
            raise OutDirError(f"--out {out} exists: pass --overwrite to replace it")
    elif storage.is_url(out):  # a prefix with objects under it, or an object of that name
        if (storage.isdir(out) or storage.isfile(out)) and not overwrite:
            raise OutDirError(f"--out {out} exists and is not an empty directory: pass "
                              "--overwrite to replace it")
    elif os.path.lexists(out):
        if not os.path.isdir(out):
            raise OutDirError(f"--out {out} is a file, not a directory: choose a directory")
        left = leftovers(out, kept)
        if left and not overwrite:
            shown = ", ".join(os.path.relpath(p, out) for p in left[:4])
            more = f" and {len(left) - 4} more" if len(left) > 4 else ""
            raise OutDirError(f"--out {out} exists and is not an empty directory ({shown}"
                              f"{more}): pass --overwrite to replace it")
    check_writable(out if kind == "dir" else os.path.dirname(real) or ".", "--out")


def input_paths(cfg: Config) -> list[Guarded]:
    """The config's inputs: the data and the base model (never written by any command)."""
    d = cfg.data
    return [Guarded("data dir (data.data_dir)", d.data_dir),
            Guarded("data file (data.path)", d.path),
            Guarded("image dir (data.image_dir)", d.image_dir),
            Guarded("tokenizer (data.tokenizer)", d.tokenizer),
            Guarded("base model (model.hf_path)", cfg.model.hf_path),
            Guarded("PEFT adapter (lora.init_from)", cfg.lora.init_from)]


def run_paths(cfg: Config) -> list[Guarded]:
    """The config's run: its dir (a fresh subdir inside is fine), checkpoints and files."""
    run = cfg.train.out_dir
    checkpoints = cfg.checkpoint.dir or (None if run is None else os.path.join(run, "checkpoints"))
    guarded = [Guarded("run dir (train.out_dir)", run, INSIDE_ALLOWED),
               Guarded("checkpoint dir (checkpoint.dir)", checkpoints)]
    if run is not None:
        guarded += [Guarded(f"run's {item} (train.out_dir)", os.path.join(run, item))
                    for item in RUN_ITEMS]
    return guarded


def protected_paths(cfg: Config, **inputs: str | None) -> list[Guarded]:
    """What an --out must never touch: the command's inputs ({what: path}) + the config's
    run and data."""
    return [Guarded(what, path) for what, path in inputs.items()] + run_paths(cfg) + \
        input_paths(cfg)


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
