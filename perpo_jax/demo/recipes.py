"""The demo's recipes: its config from the command line, and the configs of its stages
derived from it (the SFT warm-up, the base's one-shape stage, each compared method). Both
`demo.run` (the comparison) and `demo.base` (training a shipped base) build on them.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from perpo_jax.config import Config, load_config

DEMO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def demo_config(args) -> Config:
    if args.train_base:
        name = "demo_base.yaml" if args.task == "grounding" else "demo_ocr_base.yaml"
    else:
        name = "demo_shapes.yaml" if args.task == "grounding" else "demo_ocr.yaml"
    path = os.path.expanduser(args.config) if args.config else DEMO_CONFIGS / name
    overrides = list(args.overrides)
    if args.out and not args.train_base:  # --train-base: --out is the base dir, not the run's
        overrides.append(f"train.out_dir={os.path.expanduser(args.out)}")
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


def one_shape_config(cfg: Config, tokenizer_dir: str | None) -> Config:
    """The base's first stage (`demo.base_warmup_rounds` > 0): cfg's shapes task cut to one
    shape per image and attribute expressions, `demo.base_warmup_rounds` SFT rounds, and the
    tokenizer of the task's processor (`tokenizer_dir`), so both stages share token ids."""
    return _with(cfg, data={"min_objects": 1, "max_objects": 1, "relations": False,
                            "tokenizer": tokenizer_dir},
                 demo={"sft_rounds": cfg.demo.base_warmup_rounds})


# demo method -> (m3po.pairs, m3po.alpha or None for the configured one); the loss is DPO
M3PO_METHODS = {"m3po": ("m3p", None), "rm_dpo": ("rm", None), "vanilla_dpo": ("random", None),
                "m3po_alpha0": ("m3p", 0.0), "m3po_alpha1": ("m3p", 1.0)}


def method_config(cfg: Config, method: str, out_dir: str) -> Config:
    if method in M3PO_METHODS:
        pairs, alpha = M3PO_METHODS[method]
        m3po = {"pairs": pairs} if alpha is None else {"pairs": pairs, "alpha": alpha}
        return _with(cfg, loss={"name": "dpo"}, m3po=m3po, train={"out_dir": out_dir})
    if method == "rft":  # rejection-sampling fine-tuning: SFT on each list's best sample
        return _with(cfg, loss={"name": "sft", "sft_target": "best"}, train={"out_dir": out_dir})
    loss = {"name": method}
    if method == "lipo":
        loss["gamma"] = 0.0
    if method == "sft":
        loss["sft_target"] = "ground_truth"
    return _with(cfg, loss=loss, train={"out_dir": out_dir})
