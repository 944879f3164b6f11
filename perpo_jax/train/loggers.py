"""Where a run's scalars are mirrored besides metrics.jsonl (`train.loggers`): the backend
interface, the package check, and the Weights & Biases backend (docs/logging.md).

A backend receives what `RunLog.write` wrote, as `{"<kind>/<name>": value}` at the record's
step (TensorBoard's tags, the same names as metrics.jsonl's records), is told the step a
resume starts from, and is closed at the end of the run. `tensorboard` is
`run_log.EventsFile`; `wandb` is `WandbRun` below.

W&B is optional: `wandb` is imported only when `train.loggers` asks for it, and its absence is
one ConfigError naming the package and the pip command, raised before training starts.
"""

from __future__ import annotations

import importlib
import os
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from perpo_jax import storage
from perpo_jax.atomic import atomic_file
from perpo_jax.config import ConfigError

# backend name -> the pip requirement it needs (a backend absent here needs nothing extra)
PACKAGES = {"wandb": "wandb==0.31.0"}
RUN_ID_FILE = "wandb_run_id"  # under train.out_dir: the W&B run every invocation continues


class ScalarLogger(Protocol):
    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """One record's numbers, `{"<kind>/<name>": value}`, at the record's step."""

    def resume(self, step: int, logged: Sequence[tuple[int, str, Mapping[str, float]]]) -> None:
        """Called once as an invocation starts from the checkpoint of `step` (0: none);
        `logged` is what metrics.jsonl held before (step, kind, scalars), in order."""

    def close(self) -> None: ...


def require_loggers(names: Sequence[str]) -> None:
    """Imports the package of every backend in `names` that needs one; a missing one is a
    ConfigError naming it and its pip command (before a run spends minutes on data)."""
    for name in names:
        if name in PACKAGES:
            _import_backend(name)


def _import_backend(name: str) -> Any:
    # The one lazy import of the package: wandb is an optional extra (and ~1.4 s to import),
    # so a run that does not ask for it neither needs it installed nor pays for it.
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(
            f"train.loggers: {name!r} needs the {name} package, which is not installed ({e}): "
            f"pip install {PACKAGES[name]} (or pip install 'perpo-jax[{name}]'), or remove "
            f"{name} from train.loggers") from None


def read_run_id(out_dir: str) -> str | None:
    """The W&B run id stored in the run dir, or None before the first W&B invocation."""
    path = storage.join(out_dir, RUN_ID_FILE)
    if not storage.exists(path):
        return None
    return storage.read_bytes(path).decode().strip() or None


class WandbRun:
    """The W&B run of `out_dir`, created by its first W&B invocation and continued by the
    others (process 0 only: RunLog opens it only when enabled).

    The id lives in `<out_dir>/wandb_run_id` (written whole before `wandb.init`, so a kill
    right after still continues the same run) and every invocation calls
    `wandb.init(id=..., resume="allow")`: the first creates the run, the others continue it.
    The run config (`run_config`, the whole config as a dict) is given to `wandb.init`: logged
    once per invocation, not per step; its `train.wandb_project` / `wandb_entity` /
    `wandb_name` name the run (None: W&B's env vars and defaults).

    W&B's history is never rewound (`resume`). Its local files go under WANDB_DIR when set,
    else under `<out_dir>/wandb/` when out_dir is local, else W&B's default `./wandb`.
    Everything else (mode, API key, host, tags, group) is W&B's own env vars.
    """

    def __init__(self, out_dir: str, run_config: Mapping[str, Any]):
        wandb = _import_backend("wandb")
        run_id = read_run_id(out_dir)
        self.created = run_id is None
        if self.created:
            # W&B ids are [a-z0-9] (never / \ # ? % :); 12 hex digits: no collision to fear
            run_id = secrets.token_hex(6)
            with atomic_file(storage.join(out_dir, RUN_ID_FILE)) as tmp, open(tmp, "w") as f:
                f.write(run_id + "\n")
        self.run_id = run_id
        self._held_through, self._held_kinds = -1, set()  # W&B's last row (`resume`)
        train = run_config.get("train", {})
        local_dir = None if "WANDB_DIR" in os.environ or storage.is_url(out_dir) else out_dir
        # reinit="create_new": independent of any run the caller has open (a notebook's own,
        # or that of an earlier train() in this process that raised before closing its log)
        self.run = wandb.init(id=run_id, resume="allow", config=dict(run_config),
                              project=train.get("wandb_project"),
                              entity=train.get("wandb_entity"), name=train.get("wandb_name"),
                              dir=local_dir, reinit="create_new")

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Logs at W&B step `step`, except what W&B already holds (see `resume`)."""
        if not scalars:
            return
        step = int(step)
        if step <= self._held_through:
            kinds = {tag.split("/", 1)[0] for tag in scalars}
            if step < self._held_through or kinds <= self._held_kinds:
                return  # W&B got this record from the invocation that logged it first
            step += 1  # a round starting at the step W&B's last row closed: the next row
        # records of one step (a step's and the next round's) merge into W&B's row `step`
        self.run.log(dict(scalars), step=step)

    def resume(self, step: int, logged: Sequence[tuple[int, str, Mapping[str, float]]]) -> None:
        """W&B's history only grows, with rising steps (a step below its last is dropped, and
        by W&B's developers' account moved up, shifting the rest, by `wandb sync` of a resumed
        offline run; its rewind, `resume_from`, is a preview not every server has). So
        nothing is re-logged: W&B keeps
        what it got first for the steps a killed run logged past its checkpoint (the same
        values when the run is deterministic), and a round record re-logged at the step of
        W&B's last row goes to the row after it (the round's first update).

        `logged` stands for what this W&B run holds, as every invocation logs to both. A W&B
        run created now (W&B turned on for an existing run dir) is first given the records
        that stay (the ones a resume from `step` does not log again)."""
        if self.created:
            for at, kind, scalars in logged:
                if not relogged(at, [kind], step):
                    self.add_scalars(scalars, at)
            return
        self._held_through = max((at for at, _, _ in logged), default=-1)
        self._held_kinds = {kind for at, kind, _ in logged if at == self._held_through}

    def close(self) -> None:
        self.run.finish()


def relogged(record_step: int, kinds: Sequence[str], resumed_step: int) -> bool:
    """Whether a record (of `kinds`, logged at `record_step`) is logged again by a run resumed
    from the checkpoint of `resumed_step`: every record after that step, and a "round" record
    AT it (a round starting at step s logs its record after checkpoint s was saved: a
    checkpoint inside a round is past the round's first step, so that round's record stays)."""
    if record_step != resumed_step:
        return record_step > resumed_step
    return bool(kinds) and all(k == "round" for k in kinds)
