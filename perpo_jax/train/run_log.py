"""Per-step metrics of a run: JSONL (the record), TensorBoard (to watch), a PNG of curves.

Only process 0 writes. Values are plain floats by the time they get here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure  # no pyplot: no global backend state

from perpo_jax.atomic import atomic_file

CURVES = ("loss", "pair_accuracy", "mean_reward")


class RunLog:
    """Appends one JSON object per record to `<out_dir>/metrics.jsonl` and mirrors scalars to
    TensorBoard under `<out_dir>/tb`. Re-opening an existing run appends (resume)."""

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = out_dir
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._writer = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, record: Mapping[str, float], *, step: int, kind: str = "step") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for name, value in row.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and name != "step":
                    self._writer.add_scalar(f"{kind}/{name}", value, int(step))

    def records(self, kind: str | None = None) -> list[dict]:
        """Logged rows (of one kind); a line cut short by a kill is skipped."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after `step`: on resume from checkpoint `step`, the steps a killed
        run logged past it are run (and logged) again."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        with atomic_file(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
