"""Per-step metrics of a run: JSONL (the record), mirrored to the backends of `train.loggers`
(TensorBoard, Weights & Biases: `loggers.py`) to watch, and a PNG of curves.

Only process 0 writes. Values are plain floats by the time they get here. Every backend gets
each record's numbers as `<kind>/<name>` at the record's step (docs/logging.md).

TensorBoard gets ONE events file per run, `<out_dir>/tb/events.out.tfevents.perpo_jax`, that
every invocation (a resume, a failed start) appends to; it is created at the first logged
value, so an invocation that fails before logging leaves nothing behind, and a resume drops
the events logged after the checkpoint it resumes from, as it does in metrics.jsonl.

`out_dir` may be a store URL (gs://): there is no append in a store, so each write replaces
the whole object (`atomic.AppendFile`); the PNG is uploaded whole (`atomic_file`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Iterator, Mapping, Sequence

from matplotlib.figure import Figure  # no pyplot: no global backend state
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

from perpo_jax import storage
from perpo_jax.atomic import AppendFile, atomic_file
from perpo_jax.train.loggers import ScalarLogger, WandbRun, relogged, require_loggers

CURVES = ("loss", "pair_accuracy", "mean_reward")
EVENTS_FILE = "events.out.tfevents.perpo_jax"  # TensorBoard reads files named *tfevents*


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C (little-endian)."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


def _records(blob: bytes) -> Iterator[tuple[bytes, int]]:
    """(data, end offset) of each intact record of `blob`; stops at a torn or corrupt one."""
    at = 0
    while at + 12 <= len(blob):
        header = blob[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        end = at + 12 + length + 4
        if (struct.unpack("<I", blob[at + 8:at + 12])[0] != masked_crc32c(header)
                or end > len(blob)):
            return
        data = blob[at + 12:end - 4]
        if struct.unpack("<I", blob[end - 4:end])[0] != masked_crc32c(data):
            return
        yield data, end
        at = end


class EventsFile:
    """A TensorBoard events file that is appended to, never recreated (see module doc)."""

    def __init__(self, path: str):
        self.path = path
        self._file = AppendFile(path)
        self._checked = False

    def events(self) -> list[Event]:
        """Every intact event in the file (a record torn by a kill ends the list)."""
        return [Event.FromString(data) for data, _ in _records(self._file.read())]

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        scalars = {tag: v for tag, v in scalars.items() if math.isfinite(v)}
        if not scalars:
            return
        if not self._checked:
            self._drop_torn_tail()
            self._checked = True
        events = []
        if not self._file.exists():
            events.append(Event(wall_time=time.time(), file_version="brain.Event:2"))
        values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
        events.append(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        self._file.append(b"".join(_record(e.SerializeToString()) for e in events))

    def truncate_after(self, step: int) -> None:
        """Drops the events a resume from checkpoint `step` logs again (`relogged`; kept: the
        file-version header)."""
        events = self.events()
        keep = [e for e in events if not relogged(
            e.step, [v.tag.split("/", 1)[0] for v in e.summary.value], step)]
        if len(keep) < len(events):
            self._rewrite(keep)

    def resume(self, step: int, logged: Sequence) -> None:
        del logged  # the file itself says what it holds
        self.truncate_after(step)

    def close(self) -> None:
        """Nothing stays open between writes."""

    def _drop_torn_tail(self) -> None:
        """A kill mid-append leaves a partial record; appending after it would hide every
        later event from TensorBoard, so the file is cut back to its intact records."""
        blob = self._file.read()
        intact = max((end for _, end in _records(blob)), default=0)
        if intact < len(blob):
            self._rewrite([Event.FromString(data) for data, _ in _records(blob)])

    def _rewrite(self, events: Sequence[Event]) -> None:
        self._file.rewrite(b"".join(_record(e.SerializeToString()) for e in events))


class RunLog:
    """Appends one JSON object per record to `<out_dir>/metrics.jsonl` and mirrors its numbers
    to the `loggers` backends ("tensorboard": the run's one events file under `<out_dir>/tb`;
    "wandb": the run's one W&B run, `loggers.WandbRun`). Re-opening an existing run appends
    to all of them (resume). `run_config` (the config as a dict) is what W&B logs as the run's
    config; its train.wandb_* keys name the W&B run.

    A backend's package that is missing raises ConfigError here (on every process: a pod
    fails as a whole), before anything is written; only an enabled log opens the backends."""

    def __init__(self, out_dir: str, *, enabled: bool = True,
                 loggers: Sequence[str] = ("tensorboard",),
                 run_config: Mapping | None = None):
        require_loggers(loggers)
        self.out_dir = out_dir
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._file = AppendFile(self.path)
        self.events = (EventsFile(os.path.join(out_dir, "tb", EVENTS_FILE))
                       if "tensorboard" in loggers else None)
        self.loggers: list[ScalarLogger] = [self.events] if self.events is not None else []
        if enabled:
            storage.makedirs(out_dir)
            if "wandb" in loggers:
                self.loggers.append(WandbRun(out_dir, run_config or {}))

    def write(self, record: Mapping[str, float], *, step: int, kind: str = "step") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in record.items()}}
        self._file.append((json.dumps(row) + "\n").encode())
        for logger in self.loggers:
            logger.add_scalars(row_scalars(row), step)

    def records(self, kind: str | None = None) -> list[dict]:
        """Logged rows (of one kind); a line cut short by a kill is skipped."""
        rows = []
        for line in self._file.read().decode("utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def truncate_after(self, step: int) -> None:
        """Drops the rows a resume from checkpoint `step` logs again (`relogged`): the steps a
        killed run logged past it are run (and logged) again; each backend does its own
        (W&B keeps its history: `loggers.WandbRun.resume`)."""
        if not self.enabled:
            return
        logged = self.records()
        for logger in self.loggers:
            logger.resume(step, [(r.get("step", 0), r.get("kind", "step"), row_scalars(r))
                                 for r in logged])
        if not self._file.exists():
            return
        keep = [r for r in logged
                if not relogged(r.get("step", 0), [r.get("kind", "step")], step)]
        self._file.rewrite("".join(json.dumps(r) + "\n" for r in keep).encode())

    def close(self) -> None:
        """Closes the backends (W&B: finishes the run); metrics.jsonl stays closed between
        writes."""
        for logger in self.loggers:
            logger.close()


def row_scalars(row: Mapping) -> dict[str, float]:
    """A metrics.jsonl row's numbers under the backends' names, `<kind>/<name>`."""
    kind = row.get("kind", "step")
    return {f"{kind}/{name}": float(value) for name, value in row.items()
            if name not in ("kind", "step") and isinstance(value, (int, float))}


def _plain(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def plot_curves(rows: Sequence[Mapping], path: str, names: Sequence[str] = CURVES,
                title: str = "") -> None:
    """One panel per metric name against `step`; rows missing a name are skipped."""
    fig = Figure(figsize=(4.2 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 40 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
