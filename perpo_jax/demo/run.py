"""`perpo-jax demo`: base → sample → reward → PerPO / DPO / LiPO / SFT / RFT → eval → export

Everything runs locally on CPU: a synthetic dataset is generated; the base model is the shipped
`assets/demo_base` (made by `perpo-jax demo --train-base`, loaded like a user's `model.hf_path`
with its own processor) when it fits the task (`demo.base_path`), else a tiny LLaVA taught in
this process by SFT to ground imperfectly. Then, from that same base and with the same sample
budget and number of updates, each alignment method trains; all are evaluated by greedy
decoding on held-out images, again with the images shuffled among the examples (does the model
look?), and each gain over the base gets a paired bootstrap 95 % interval. Writes
`<out>/report.json`, `<out>/methods.png` (bar chart), `<out>/<method>/curves.png`,
`<out>/val_boxes.png` (GT vs base vs PerPO) and an HF export of the PerPO model.

    perpo-jax demo                                  # the README's first command
    perpo-jax demo --train-base --out DIR           # make a base (configs/demo_base.yaml)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from perpo_jax.demo import base as demo_base, report as demo_report
from perpo_jax.cli_paths import Guarded, check_out_dir, clear_out, input_paths, resolve_paths
from perpo_jax.config import Config, ConfigError
from perpo_jax.data import prepare
from perpo_jax.demo.args import parse_args  # noqa: F401  (the demo's CLI: run.parse_args)
from perpo_jax.demo.recipes import _with, demo_config, method_config, sft_config
from perpo_jax.eval import evaluate, evaluate_pope
from perpo_jax.hf import save_pretrained
from perpo_jax.eval.grounding import predicted_boxes
from perpo_jax.eval.report import draw_boxes_png, write_report
from perpo_jax import assemble
from perpo_jax.models.lora import merge_lora
from perpo_jax.train.loop import train

def main(argv=None) -> dict:
    argv = list(argv or [])
    args = parse_args(argv)
    cfg = demo_config(args)
    if args.train_base:
        if not args.out:
            raise ConfigError("--train-base: --out DIR (the base dir to write) is required")
        return demo_base.train_base(cfg, args.out, command=argv, overwrite=args.overwrite)
    base_path, why = demo_base.resolve_base_path(cfg)
    print(f"[demo] {why}", flush=True)
    if base_path is not None:  # loaded exactly as a user's model.hf_path, processor included
        cfg = _with(cfg, model={"hf_path": base_path})
    out = cfg.train.out_dir
    _claim_out(cfg, base_path, overwrite=args.overwrite)
    os.makedirs(out, exist_ok=True)
    methods = list(cfg.demo.methods)

    t_start = time.perf_counter()
    mesh = assemble.build_mesh(cfg)
    data = prepare.prepare_data(cfg)
    print(f"[demo] data: {len(data.train)} train / {len(data.val)} val in {data.data_dir}; "
          f"devices: {jax.device_count()} x {jax.devices()[0].platform}", flush=True)

    # 1) the base: loaded, or SFT from random init until it grounds imperfectly
    start_model = assemble.build_run_model(cfg, mesh, data.processor)
    if base_path is None:
        sft = train(sft_config(cfg, os.path.join(out, "sft_warmup")), data=data,
                    model=start_model, mesh=mesh)
        start_model = sft.model
    check = _Checks(data, cfg, mesh, _pope_examples(cfg))
    results = {"sft_warmup": check.evaluate(start_model)}
    print(f"[demo] base ({'loaded' if base_path else 'SFT warm-up'}): "
          f"{results['sft_warmup']['metrics']}", flush=True)

    # 2) every method from the SAME base weights, same budget
    trained = {}
    for method in methods:
        mcfg = method_config(cfg, method, os.path.join(out, method))
        t0 = time.perf_counter()
        run = train(mcfg, data=data, model=nnx.clone(start_model), mesh=mesh)
        trained[method] = run.model
        res = check.evaluate(run.model, base=results["sft_warmup"])
        res["train_seconds"] = time.perf_counter() - t0
        res["samples_per_s"] = _mean([r.get("samples_per_s") for r in run.rounds])
        res["mean_round_reward"] = [r.get("mean_reward") for r in run.rounds]
        results[method] = res
        print(f"[demo] {method}: {res['metrics']}", flush=True)

    report = {"task": args.task, "config": dataclasses.asdict(cfg), "results": results,
              "base": {"path": base_path, "trained_in_process": base_path is None,
                       "why": why, "card": _card_summary(base_path)},
              "image_shuffle_seed": demo_report.SHUFFLE_SEED if cfg.demo.image_shuffle_check
              else None,
              "seconds": time.perf_counter() - t_start}
    _write_outputs(report, results, trained, start_model, data, cfg, mesh, out)
    _print_table(results)
    return report


def _claim_out(cfg: Config, base_path: str | None, *, overwrite: bool) -> None:
    """Before any work: the demo's --out (train.out_dir) must be empty but for the dataset
    (data.data_dir, when inside it: a cache keyed on its content, reused), or --overwrite
    given -- then it is cleared, so no file of an earlier run (another --task, other
    methods) stays beside this run's. The --out guard of every command applies too (never
    the working dir, $HOME, the data or the base)."""
    paths = resolve_paths(copy.deepcopy(cfg))
    out, data_dir = paths.train.out_dir, paths.data.data_dir
    kept = [data_dir] if data_dir and os.path.realpath(data_dir).startswith(
        os.path.realpath(out).rstrip(os.sep) + os.sep) else []
    guarded = [g for g in input_paths(paths) if not (kept and g.path == data_dir)]
    if base_path is not None:
        guarded.append(Guarded("demo base (demo.base_path)", os.path.abspath(base_path)))
    check_out_dir(out, guarded, overwrite, kept=kept)
    if overwrite and os.path.isdir(out):
        clear_out(out, kept)


def _card_summary(base_path: str | None) -> dict | None:
    """The base card's provenance (command, time, machine, val metrics), not its lists."""
    if base_path is None:
        return None
    card = demo_base.read_card(base_path)
    return {k: card.get(k) for k in ("command", "seconds", "machine", "val_examples",
                                     "val_metrics")}


class _Checks:
    """Evaluates a model on val: metrics, per-example scores, the gain over the base with its
    bootstrap interval, the shuffled-image metrics and POPE (when configured)."""

    def __init__(self, data, cfg: Config, mesh, pope):
        self.data, self.cfg, self.mesh, self.pope = data, cfg, mesh, pope
        n = min(cfg.eval.num_examples, len(data.val))
        self.shuffled_data = dataclasses.replace(
            data, val=demo_report.ShuffledImages(data.val, demo_report.image_derangement(n)))

    def evaluate(self, model, base: dict | None = None) -> dict:
        cfg = self.cfg
        out = _eval(evaluate, model, self.data, cfg, self.mesh, self.pope)
        if base is not None:
            out["gain_over_base"] = demo_report.gains_over_base(
                base["scores"], out["scores"], samples=cfg.demo.bootstrap_samples)
        if cfg.demo.image_shuffle_check:
            mixed = evaluate(model, self.shuffled_data, cfg, split="val", mesh=self.mesh,
                             progress=False)
            head = demo_report.table_metrics(self.data.task)[0]
            out["shuffled"] = demo_report.shuffle_gap(out["metrics"], mixed.metrics, head)
            out["shuffled_metrics"] = {k: v for k, v in mixed.metrics.items()
                                       if isinstance(v, (int, float))}
        return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _eval(evaluate, model, data, cfg, mesh, pope=None) -> dict:
    res = evaluate(model, data, cfg, split="val", mesh=mesh, progress=False)
    scores = demo_report.example_scores(data.task, res.texts, res.gt)
    out = {"metrics": dict(res.metrics), "texts": list(res.texts),
           "scores": {k: v.tolist() for k, v in scores.items()}}
    if pope:
        report = evaluate_pope(model, data.processor, pope, cfg, mesh=mesh)
        out["metrics"]["pope_f1"] = report["mean_f1"]
        out["pope"] = report["splits"]
    return out


def _pope_examples(cfg: Config) -> dict | None:
    """{split: examples} of a shapes_pope set of `demo.pope_images` val images drawn like the
    demo's scenes (None when demo.pope_images = 0)."""
    if not cfg.demo.pope_images:
        return None
    from perpo_jax.data import shapes_pope

    d = cfg.data
    builder = shapes_pope.build(d.data_dir, num_train=0, num_val=cfg.demo.pope_images,
                                image_size=d.image_size, seed=d.seed + 1,
                                min_objects=d.min_objects, max_objects=d.max_objects)
    return {split: [prepare.record_example(src[i]) for i in range(len(src))]
            for split, src in shapes_pope.pope_splits(builder).items()}


def _write_outputs(report, results, trained, sft_model, data, cfg, mesh, out) -> None:
    # per-example texts and scores stay out of report.json (the intervals summarise them)
    slim = dict(report, results={k: {kk: vv for kk, vv in v.items()
                                     if kk not in ("texts", "scores")}
                                 for k, v in results.items()})
    write_report(os.path.join(out, "report.json"), slim)
    _bar_chart(results, os.path.join(out, "methods.png"), cfg.data.task)
    if cfg.data.task == "grounding" and "perpo" in results:
        _val_boxes(results, data, cfg, os.path.join(out, "val_boxes.png"))
    if "perpo" in trained:
        _export_and_check(trained["perpo"], data, cfg, os.path.join(out, "perpo_hf"))


def _headline(task: str) -> str:
    return "acc@0.5" if task == "grounding" else "ned"


# How the plots name a results entry ("sft_warmup" is the base, shipped or trained here)
PLOT_LABELS = {"sft_warmup": "base"}


def _bar_chart(results: dict, path: str, task: str) -> None:
    key = _headline(task)
    values = [results[n]["metrics"].get(key, float("nan")) for n in results]
    names = [PLOT_LABELS.get(n, n) for n in results]
    fig = Figure(figsize=(1.3 * len(names) + 2, 3.2))
    ax = fig.subplots()
    ax.bar(names, values, color=["#999999"] + ["#4477aa"] * (len(names) - 1))
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(key)
    ax.set_title(f"held-out {key} by method")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _val_boxes(results: dict, data, cfg, path: str) -> None:
    n = min(cfg.eval.num_images, len(results["perpo"]["texts"]))
    examples = [prepare.record_example(data.val[i]) for i in range(n)]
    preds = {name: predicted_boxes(results[name]["texts"][:n]) for name in ("sft_warmup", "perpo")}
    draw_boxes_png(path, [ex.image for ex in examples], np.stack([ex.box for ex in examples]),
                   {"base": preds["sft_warmup"], "PerPO": preds["perpo"]},
                   [ex.question.split(": ")[-1] for ex in examples])


def _export_and_check(model, data, cfg, out_dir: str) -> None:
    """HF export of the trained model, then transformers must load it (no missing keys)."""

    merge_lora(model)
    save_pretrained(model, out_dir)
    data.processor.save_pretrained(os.path.join(out_dir, "processor"))
    try:
        import torch  # noqa: F401  (transformers' LLaVA is a PyTorch model)
        from transformers import LlavaForConditionalGeneration
    except ImportError:
        print(f"[demo] exported PerPO model to {out_dir}; torch is not installed, so the "
              "transformers load check was skipped (pip install -r requirements-demo.txt)")
        return
    loaded, info = LlavaForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    missing = info.get("missing_keys", []) or []
    unexpected = info.get("unexpected_keys", []) or []
    if missing or unexpected:
        raise RuntimeError(f"HF export {out_dir} does not load cleanly: missing={missing} "
                           f"unexpected={unexpected}")
    print(f"[demo] exported PerPO model to {out_dir}; transformers loads it "
          f"({sum(p.numel() for p in loaded.parameters())} parameters)", flush=True)


def _print_table(results: dict) -> None:
    """One aligned row per method: the task's few metrics, the headline gain over the base
    with its interval, the shuffled-image check, then the two rates (report.json has all)."""
    demo_report.print_table(results)
