"""The train command's progress bar (process 0 only): steps, loss, pair accuracy where the
loss has pairs, tokens/s, and an ETA that starts after the compile.

    bar = progress_bar(enabled, total=steps, initial=done)
    advance(bar, metrics)           # after each update
    say(bar, "[round 1] ...")       # a line above the bar (a plain print without one)
"""
from __future__ import annotations

import jax
from tqdm.auto import tqdm


def say(bar, text: str) -> None:
    """A line above the progress bar (or plain print without one)."""
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
    bar.set_postfix_str("compiling…")
    bar.compiled = False
    return bar


def advance(bar, metrics: dict) -> None:
    """Progress with the metric names of metrics.jsonl; the clock and the smoothed rate (so
    the ETA) restart after the first step of this process, whose time is mostly compilation."""
    if bar is None:
        return
    if bar.compiled:
        bar.update(1)
    else:
        bar.compiled = True
        done = bar.n + 1
        bar.reset()  # restarts start_t AND tqdm's smoothed rate (start_t alone keeps the rate)
        bar.initial = bar.n = bar.last_print_n = done
    bar.set_postfix(bar_fields(metrics))


def bar_fields(metrics: dict) -> dict[str, str]:
    """The progress bar's figures: loss, pair_accuracy where the loss has pairs (not SFT/RFT,
    whose lists have one target), tokens/s."""
    fields = {"loss": f"{metrics['loss']:.4f}"}
    if "pair_accuracy" in metrics:
        fields["pair_accuracy"] = f"{metrics['pair_accuracy']:.2f}"
    fields["tokens_per_s"] = f"{metrics['tokens_per_s']:.0f}"
    return fields
