"""The demo's report: per-example scores, gains over the base with paired bootstrap
intervals, the shuffled-image check and the printed table.

Host-side numpy only (the models are run by `perpo_jax.demo.run`):

    scores = example_scores("grounding", texts, gt_boxes)     # {"acc@0.5": [N], "mean_iou": [N]}
    gains = gains_over_base(base_scores, scores, samples=2000)  # {metric: {mean, lo, hi, ...}}
    val = ShuffledImages(data.val, image_derangement(n, seed=0))  # image of another example
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from perpo_jax.eval.bootstrap import paired_bootstrap_gain
from perpo_jax.rewards import REWARDS, iou_rewards, ocr_rewards

# The metrics a task's table shows and compares, first = the headline (the report.json has all)
TABLE_METRICS = {"grounding": ("acc@0.5", "mean_iou"), "ocr": ("ned", "edit_similarity")}
# Metrics where lower is better (the headline's "gain" is then a reduction)
LOWER_IS_BETTER = ("ned",)
# The seed of the fixed permutation of val images (the same for every method and seed)
SHUFFLE_SEED = 1234


def table_metrics(task: str) -> tuple[str, ...]:
    """The per-example metrics of `task` (unknown tasks: their registered reward)."""
    return TABLE_METRICS.get(task, ("mean_reward",))


def example_scores(task: str, texts: Sequence[str], gt) -> dict[str, np.ndarray]:
    """Per-example scores whose means are the task's table metrics.

    texts [N]; gt: boxes [N, 4] (grounding) or reference strings [N]. Returns
    grounding {"acc@0.5": 0/1 [N], "mean_iou": IoU [N]}; ocr {"ned": [N], "edit_similarity": [N]};
    other tasks {"mean_reward": [N]} from `REWARDS[task]`. float64 throughout.
    """
    if task == "grounding":
        iou = iou_rewards(list(texts), np.asarray(gt, np.float32)).astype(np.float64)
        return {"acc@0.5": (iou >= 0.5).astype(np.float64), "mean_iou": iou}
    if task == "ocr":
        similarity = ocr_rewards(list(texts), list(gt)).astype(np.float64)
        return {"ned": 1.0 - similarity, "edit_similarity": similarity}
    return {"mean_reward": np.asarray(REWARDS[task](list(texts), list(gt)), np.float64)}


def gains_over_base(base: Mapping[str, Sequence[float]], method: Mapping[str, Sequence[float]],
                    *, samples: int, seed: int = 0) -> dict[str, dict]:
    """{metric: paired_bootstrap_gain(base[metric], method[metric])} over the shared metrics
    (both [N] on the same examples, in the same order)."""
    return {key: paired_bootstrap_gain(base[key], method[key], samples=samples, seed=seed)
            for key in base if key in method}


def image_derangement(n: int, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """[n] int: a permutation with no fixed point (n >= 2), so every example gets ANOTHER
    example's image. A random cycle: order = shuffled indices, order[k] takes order[k+1]'s."""
    if n < 2:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


class ShuffledImages:
    """A val source whose first len(perm) records carry the image of record perm[i] (the
    question, answer and box stay record i's); records past them are unchanged."""

    def __init__(self, source, perm: np.ndarray):
        self.source, self.perm = source, np.asarray(perm)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        record = dict(self.source[i])
        if i < len(self.perm):
            record["image"] = self.source[int(self.perm[i])]["image"]
        return record


def shuffle_gap(metrics: Mapping, shuffled: Mapping, key: str) -> dict:
    """{key: on shuffled images, "gap": real - shuffled (lower-is-better keys: shuffled - real)},
    so a positive gap always means the model does better with the right image."""
    real, mixed = float(metrics[key]), float(shuffled[key])
    gap = mixed - real if key in LOWER_IS_BETTER else real - mixed
    return {key: mixed, "gap": gap}


# ----------------------------------------------------------------------------- table

# The table's two rates, each with one meaning: (column header, what it counts)
RATES = (("train samples/s", "candidates sampled per second in the method's training rounds "
          "(- : trained on the ground truth, nothing sampled)"),
         ("eval ex/s", "held-out examples greedy-decoded per second"))
_PREFERRED = ("acc@0.5", "mean_iou", "ned", "edit_similarity", "pope_f1", "mean_reward")


def _shown_metrics(results: Mapping) -> list[str]:
    """The few metrics the table shows: the preferred ones present, else every numeric one."""
    present = {k for r in results.values() for k, v in r["metrics"].items()
               if isinstance(v, (int, float)) and k not in ("count", "samples_per_s")}
    keys = [k for k in _PREFERRED if k in present]
    return keys or sorted(present)


def _interval(gain: Mapping | None) -> str:
    return "-" if not gain else f"{gain['mean']:+.3f} [{gain['lo']:+.3f},{gain['hi']:+.3f}]"


def _number(value, fmt: str = ".4f") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def table_rows(results: Mapping) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of cells): method, each shown metric, the headline's gain over the base
    with its 95 % interval and its shuffled-image value and gap (when present), the rates."""
    keys = _shown_metrics(results)
    head = keys[0] if keys else None
    has_gain = any(head in (r.get("gain_over_base") or {}) for r in results.values())
    has_shuffle = any(r.get("shuffled") for r in results.values())
    headers = ["method", *keys]
    if has_gain:
        headers.append(f"gain {head} [95% CI]")
    if has_shuffle:
        headers += [f"{head} shuffled", "image gap"]
    headers += [h for h, _ in RATES]
    rows = []
    for name, r in results.items():
        row = [name] + [_number(r["metrics"].get(k)) for k in keys]
        if has_gain:
            row.append(_interval((r.get("gain_over_base") or {}).get(head)))
        if has_shuffle:
            shuffled = r.get("shuffled") or {}
            row += [_number(shuffled.get(head)), _number(shuffled.get("gap"), "+.4f")]
        train_rate, eval_rate = r.get("samples_per_s"), r["metrics"].get("samples_per_s")
        row += [_number(train_rate or None, ".1f"), _number(eval_rate or None, ".1f")]
        rows.append(row)
    return headers, rows


def format_table(results: Mapping) -> str:
    """The aligned table: one column per header, each as wide as its widest cell + 2."""
    headers, rows = table_rows(results)
    widths = [max(len(c) for c in col) + 2 for col in zip(headers, *rows)]

    def line(cells):
        first = f"{cells[0]:<{widths[0]}}"
        return first + "".join(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:]))

    out = [line(headers), "-" * sum(widths), *(line(r) for r in rows)]
    out += [f"  {header}: {meaning}" for header, meaning in RATES]
    if any(r.get("gain_over_base") for r in results.values()):
        out.append("  gain: method - base on the same val examples, paired bootstrap 95 % interval")
    if any(r.get("shuffled") for r in results.values()):
        out.append("  shuffled: val images permuted among the examples (a fixed derangement); "
                   "image gap = real - shuffled")
    return "\n".join(out)


def print_table(results: Mapping) -> None:
    """The table, then one JSON line of every model's metrics."""
    print(format_table(results))
    print(json.dumps({n: r["metrics"] for n, r in results.items()}))
