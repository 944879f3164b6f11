"""`perpo-jax demo`: SFT → sample → reward → PerPO / DPO / LiPO / continued SFT → eval → export.

Everything runs locally on CPU from nothing: a synthetic dataset and tokenizer are generated,
a tiny LLaVA is initialised at random and taught by SFT to ground imperfectly; then, from
that same SFT model and with the same sample budget and number of updates, each alignment
method trains; all are evaluated by greedy decoding on held-out images. Writes
`<out>/report.json`, `<out>/methods.png` (bar chart), `<out>/<method>/curves.png`,
`<out>/val_boxes.png` (GT vs SFT vs PerPO) and an HF export of the PerPO model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from perpo_jax.config import DEMO_METHODS, Config, load_config
from perpo_jax.data import prepare
from perpo_jax.evaluate import evaluate
from perpo_jax.hf import save_pretrained
from perpo_jax.metrics import draw_boxes_png, predicted_boxes, write_report
from perpo_jax.models import from_config
from perpo_jax.models.lora import merge_lora
from perpo_jax.train.loop import train

DEMO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="perpo-jax demo", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("grounding", "ocr"), default="grounding")
    p.add_argument("--config", default=None, help="default: configs/demo_shapes.yaml (or demo_ocr.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: train.out_dir)")
    p.add_argument("--method", default=None, type=_methods, metavar="M[,M...]",
                   help="comma-separated methods to train from the SFT model (default: "
                        "demo.methods); m3po = DPO on M3P-Score pairs, rm_dpo / vanilla_dpo its "
                        "pair baselines, m3po_alpha0 / m3po_alpha1 the alpha ablation; any of "
                        f"{', '.join(DEMO_METHODS)}")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in DEMO_METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{bad or text!r}: methods are {', '.join(DEMO_METHODS)}")
    return names


def demo_config(args) -> Config:
    name = "demo_shapes.yaml" if args.task == "grounding" else "demo_ocr.yaml"
    path = args.config or DEMO_CONFIGS / name
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.method:
        overrides.append(f"demo.methods=[{', '.join(args.method)}]")
    return load_config(path, overrides)


def _with(cfg: Config, **sections) -> Config:
    """A copy of cfg with some fields of some sections replaced: _with(cfg, loss={"name": "dpo"})."""
    out = dataclasses.replace(cfg)
    for section, fields in sections.items():
        setattr(out, section, dataclasses.replace(getattr(cfg, section), **fields))
    return out


def sft_config(cfg: Config, out_dir: str) -> Config:
    """Supervised warm-up on ground-truth answers (no sampling), settings from `demo.*`."""
    d = cfg.demo
    return _with(
        cfg,
        loss={"name": "sft", "sft_target": "ground_truth"},
        train={"rounds": d.sft_rounds, "steps": d.sft_steps, "out_dir": out_dir,
               "lists_per_step": d.sft_lists_per_step or cfg.train.lists_per_step},
        sampling={"prompts_per_round": d.sft_prompts_per_round or cfg.sampling.prompts_per_round},
        optim={"lr": d.sft_lr},
        lora={"enabled": False},
    )


# demo method -> (m3po.pairs, m3po.alpha or None for the configured one); the loss is DPO
M3PO_METHODS = {"m3po": ("m3p", None), "rm_dpo": ("rm", None), "vanilla_dpo": ("random", None),
                "m3po_alpha0": ("m3p", 0.0), "m3po_alpha1": ("m3p", 1.0)}


def method_config(cfg: Config, method: str, out_dir: str) -> Config:
    if method in M3PO_METHODS:
        pairs, alpha = M3PO_METHODS[method]
        m3po = {"pairs": pairs} if alpha is None else {"pairs": pairs, "alpha": alpha}
        return _with(cfg, loss={"name": "dpo"}, m3po=m3po, train={"out_dir": out_dir})
    loss = {"name": method}
    if method == "lipo":
        loss["gamma"] = 0.0
    if method == "sft":
        loss["sft_target"] = "ground_truth"
    return _with(cfg, loss=loss, train={"out_dir": out_dir})


def main(argv=None) -> dict:
    args = parse_args(argv or [])
    cfg = demo_config(args)
    out = cfg.train.out_dir
    os.makedirs(out, exist_ok=True)
    methods = list(cfg.demo.methods)


    t_start = time.perf_counter()
    for run_dir in ["sft_warmup", *methods, "perpo_hf"]:
        # The demo owns these folders and always starts fresh (the dataset is reused).
        shutil.rmtree(os.path.join(out, run_dir), ignore_errors=True)
    mesh = from_config.build_mesh(cfg)
    data = prepare.prepare_data(cfg)
    print(f"[demo] data: {len(data.train)} train / {len(data.val)} val in {data.data_dir}; "
          f"devices: {jax.device_count()} x {jax.devices()[0].platform}", flush=True)

    # 1) SFT from random init until it grounds imperfectly
    base = from_config.build_model(cfg, mesh, data.processor)
    sft = train(sft_config(cfg, os.path.join(out, "sft_warmup")), data=data, model=base, mesh=mesh)
    sft_model = sft.model
    pope = _pope_examples(cfg)
    results = {"sft_warmup": _eval(evaluate, sft_model, data, cfg, mesh, pope)}
    print(f"[demo] SFT warm-up: {results['sft_warmup']['metrics']}", flush=True)

    # 2) every method from the SAME SFT weights, same budget
    trained = {}
    for method in methods:
        mcfg = method_config(cfg, method, os.path.join(out, method))
        t0 = time.perf_counter()
        run = train(mcfg, data=data, model=nnx.clone(sft_model), mesh=mesh)
        trained[method] = run.model
        res = _eval(evaluate, run.model, data, cfg, mesh, pope)
        res["train_seconds"] = time.perf_counter() - t0
        res["samples_per_s"] = _mean([r.get("samples_per_s") for r in run.rounds])
        res["mean_round_reward"] = [r.get("mean_reward") for r in run.rounds]
        results[method] = res
        print(f"[demo] {method}: {res['metrics']}", flush=True)

    report = {"task": args.task, "config": dataclasses.asdict(cfg), "results": results,
              "seconds": time.perf_counter() - t_start}
    _write_outputs(report, results, trained, sft_model, data, cfg, mesh, out)
    _print_table(results)
    return report


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _eval(evaluate, model, data, cfg, mesh, pope=None) -> dict:
    res = evaluate(model, data, cfg, split="val", mesh=mesh, progress=False)
    out = {"metrics": dict(res.metrics), "texts": list(res.texts)}
    if pope:
        from perpo_jax.data.pope import evaluate_pope

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
    slim = dict(report, results={k: {kk: vv for kk, vv in v.items() if kk != "texts"}
                                 for k, v in results.items()})
    write_report(os.path.join(out, "report.json"), slim)
    _bar_chart(results, os.path.join(out, "methods.png"), cfg.data.task)
    if cfg.data.task == "grounding" and "perpo" in results:
        _val_boxes(results, data, cfg, os.path.join(out, "val_boxes.png"))
    if "perpo" in trained:
        _export_and_check(trained["perpo"], data, cfg, os.path.join(out, "perpo_hf"))


def _headline(task: str) -> str:
    return "acc@0.5" if task == "grounding" else "ned"


def _bar_chart(results: dict, path: str, task: str) -> None:
    key = _headline(task)
    names = list(results)
    values = [results[n]["metrics"].get(key, float("nan")) for n in names]
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
                   {"SFT": preds["sft_warmup"], "PerPO": preds["perpo"]},
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


# The table's two rates, each with one meaning: (column header, what it counts)
_RATES = (("train samples/s", "candidates sampled per second in the method's training rounds "
           "(- : trained on the ground truth, nothing sampled)"),
          ("eval ex/s", "held-out examples greedy-decoded per second"))


def _rate(value, width: int) -> str:
    return f"{value:>{width}.1f}" if value else f"{'-':>{width}}"


def _print_table(results: dict) -> None:
    """One row per method: the eval metrics, then `_RATES` (never one column for both)."""
    keys = sorted({k for r in results.values() for k, v in r["metrics"].items()
                   if isinstance(v, (int, float)) and k not in ("count", "samples_per_s")})
    widths = [len(header) + 2 for header, _ in _RATES]
    head = (f"{'method':<12}" + "".join(f"{k:>14}" for k in keys)
            + "".join(f"{header:>{w}}" for (header, _), w in zip(_RATES, widths)))
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        row = f"{name:<12}" + "".join(f"{r['metrics'].get(k, float('nan')):>14.4f}" for k in keys)
        train_rate, eval_rate = r.get("samples_per_s"), r["metrics"].get("samples_per_s")
        print(row + _rate(train_rate, widths[0]) + _rate(eval_rate, widths[1]))
    for header, meaning in _RATES:
        print(f"  {header}: {meaning}")
    print(json.dumps({n: r["metrics"] for n, r in results.items()}))
