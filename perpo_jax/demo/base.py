"""The demo's base model: made by `perpo-jax demo --train-base --out DIR`, found by the demo.

    perpo-jax demo --train-base --out assets/demo_base          # configs/demo_base.yaml
    perpo-jax demo demo.base_path=assets/demo_base              # align from it

A base dir is an ordinary HF LLaVA checkpoint (`perpo_jax.hf.save_pretrained`: config.json +
safetensors) with its processor's files (tokenizer, image processor, perpo_processor.json),
so `load_pretrained(DIR)` and `LlavaPromptProcessor.from_hf(DIR)` read it like a user's
checkpoint, plus `base_card.json`: the command line, wall time, machine, the full config and
the val metrics (with per-example IoUs/predictions, so a slice can be re-checked).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from perpo_jax.atomic import atomic_dir
from perpo_jax.config import Config, ConfigError, DataConfig
from perpo_jax.demo.recipes import one_shape_config, sft_config

BASE_CARD = "base_card.json"
# The bases shipped with the project, one per demo task (`demo.base_path: auto` uses the one
# made for the config's task): grounding (configs/demo_base.yaml), OCR (demo_ocr_base.yaml)
_ASSETS = Path(__file__).resolve().parents[2] / "assets"
SHIPPED_BASE, SHIPPED_OCR_BASE = _ASSETS / "demo_base", _ASSETS / "demo_base_ocr"
SHIPPED_BASES = (SHIPPED_BASE, SHIPPED_OCR_BASE)
# data.* settings that define the task a base was trained for: generated example i depends
# only on these (not on num_train / num_val), so a base fits a config that agrees on all of
# them. TFDS shuffles records by key, so which example is the i-th val RECORD also depends on
# num_val: a card's per-example numbers re-check only with the same num_val
TASK_KEYS = ("task", "source", "image_size", "min_objects", "max_objects", "relations", "seed",
             "shape_sides", "ocr_font_size", "ocr_max_lines", "ocr_max_words", "ocr_pitch",
             "ocr_placement")


def task_signature(data_config) -> dict:
    """{key: value} of `TASK_KEYS` from a DataConfig (or its dict form; a key a card written
    before it existed lacks reads as the DataConfig default)."""
    if isinstance(data_config, dict):
        defaults = dataclasses.asdict(DataConfig())
        return {key: data_config.get(key, defaults[key]) for key in TASK_KEYS}
    return {key: getattr(data_config, key) for key in TASK_KEYS}


def read_card(base_dir: str) -> dict:
    """`base_card.json` of a base dir; FileNotFoundError naming it when absent."""
    path = os.path.join(base_dir, BASE_CARD)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a demo base (made by `perpo-jax demo --train-base`)")
    with open(path) as f:
        return json.load(f)


def _mismatch(card: dict, cfg: Config) -> dict:
    """{key: (the base's value, this config's)} where the tasks differ."""
    theirs = task_signature(card.get("config", {}).get("data", {}))
    ours = task_signature(cfg.data)
    return {k: (theirs[k], ours[k]) for k in TASK_KEYS if theirs[k] != ours[k]}


def resolve_base_path(cfg: Config, shipped=SHIPPED_BASES) -> tuple[str | None, str]:
    """(absolute base dir or None = train the warm-up in-process, why in one line).

    demo.base_path: null → None; "auto" → the first dir of `shipped` that exists and whose
    card's task (`TASK_KEYS`) equals cfg.data's, else None; a path → that dir (ConfigError
    when it is not a directory; a task mismatch is only reported, the user asked for that base).
    """
    value = cfg.demo.base_path
    if value is None:
        return None, "demo.base_path=null: training the SFT warm-up in-process"
    if value == "auto":
        present = [Path(p) for p in shipped if Path(p).is_dir()]
        if not present:
            return None, (f"no shipped base in {', '.join(map(str, shipped))}: training the SFT "
                          "warm-up in-process (make one with `perpo-jax demo --train-base --out "
                          "DIR`)")
        diffs = {}
        for base in present:
            diffs[base.name] = _mismatch(read_card(str(base)), cfg)
            if not diffs[base.name]:
                return str(base), f"aligning from the shipped base {base}"
        return None, (f"the shipped bases were made for other tasks (data.* base vs this "
                      f"config: {diffs}): training the SFT warm-up in-process")
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isdir(path):
        raise ConfigError(f"demo.base_path: {value} is not a directory")
    diff = _mismatch(read_card(path), cfg)
    note = f" (its task differs from this config's data.*: {diff})" if diff else ""
    return path, f"aligning from the base {path}{note}"


def machine() -> dict:
    """Where a run happened: platform, CPU cores (all / usable by this process), devices."""
    import jax

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpus_usable": usable,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}


def base_card(cfg: Config, *, command: list[str], seconds: float, metrics: dict,
              scores: dict, texts: list[str]) -> dict:
    """The card written next to a base. metrics: the val metrics of the first N examples
    (N = len(texts), recorded as val_examples); scores: {metric: [N]} per example."""
    return {
        "command": "perpo-jax demo " + shlex.join(command),
        "seconds": seconds,
        "machine": machine(),
        "task": task_signature(cfg.data),
        "val_examples": len(texts),
        "val_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "val_scores": {k: [float(x) for x in v] for k, v in scores.items()},
        "val_predictions": list(texts),
        "config": dataclasses.asdict(cfg),
    }


def write_base(model, processor, out_dir: str, card: dict) -> str:
    """HF checkpoint + the processor's files + base_card.json in `out_dir`, atomically (a
    failure leaves `out_dir` as it was). Returns the absolute out_dir."""
    from perpo_jax.hf import save_pretrained

    out_dir = os.path.abspath(out_dir)
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        # processor.save_pretrained replaces its dir as a whole: save it aside, then let
        # save_pretrained copy its files next to the weights
        processor_dir = os.path.join(scratch, "processor")
        processor.save_pretrained(processor_dir)
        save_pretrained(model, tmp, source_dir=processor_dir)
        with open(os.path.join(tmp, BASE_CARD), "w") as f:
            json.dump(card, f, indent=1)
    return out_dir


def train_base(cfg: Config, out_dir: str, *, command: list[str], overwrite: bool) -> dict:
    """`perpo-jax demo --train-base`: the demo's SFT warm-up (demo.sft_*) from a random tiny
    LLaVA (after `demo.base_warmup_rounds` rounds on one-shape scenes, when > 0), evaluated on
    the first eval.num_examples val examples and written to `out_dir` as a base
    (`write_base`). The SFT runs themselves (checkpoints, curves) go to
    <train.out_dir>/base_sft (and base_sft_one_shape), started fresh. Returns the card."""
    from perpo_jax.cli_paths import check_out_dir, protected_paths, resolve_paths
    from perpo_jax.data import prepare
    from perpo_jax.demo.report import example_scores
    from perpo_jax.eval import evaluate
    from perpo_jax import assemble
    from perpo_jax.train.loop import train

    cfg = resolve_paths(cfg)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    check_out_dir(out_dir, protected_paths(cfg), overwrite)  # before any work: refuse early
    run_dir = os.path.join(cfg.train.out_dir, "base_sft")
    stage_dir = os.path.join(cfg.train.out_dir, "base_sft_one_shape")
    for old in (run_dir, stage_dir):
        shutil.rmtree(old, ignore_errors=True)  # a fresh SFT, never a resumed one
    start = time.perf_counter()
    mesh = assemble.build_mesh(cfg)
    data = prepare.prepare_data(cfg)
    model = assemble.build_run_model(cfg, mesh, data.processor)
    if cfg.demo.base_warmup_rounds:
        stage = one_shape_config(cfg, data.processor_dir)
        print(f"[demo] base stage 1: {stage.demo.sft_rounds} SFT rounds on one-shape scenes",
              flush=True)
        model = train(sft_config(stage, stage_dir), data=prepare.prepare_data(stage),
                      model=model, mesh=mesh).model
    print(f"[demo] training a base: SFT on {cfg.data.source} ({len(data.train)} train), "
          f"run dir {run_dir}", flush=True)
    sft = train(sft_config(cfg, run_dir), data=data, model=model, mesh=mesh)
    res = evaluate(sft.model, data, cfg, split="val", mesh=mesh, progress=False)
    seconds = time.perf_counter() - start
    card = base_card(cfg, command=command, seconds=seconds, metrics=res.metrics,
                     scores=example_scores(data.task, res.texts, res.gt), texts=res.texts)
    write_base(sft.model, data.processor, out_dir, card)
    print(f"[demo] base written to {out_dir} in {seconds:.0f} s; val ({card['val_examples']} "
          f"examples): {card['val_metrics']}", flush=True)
    return card
