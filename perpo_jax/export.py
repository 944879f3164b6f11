"""Checkpoints out to Hugging Face and in from it, as Python calls (the CLI's `export` and
`convert` are these plus the `--out` guard of `cli_paths`):

    cfg = run_config("runs/x/checkpoints")                    # the config saved with the run
    export_merged(cfg, "runs/x/checkpoints", "runs/x/hf")     # LoRA merged into the base
    export_adapter(cfg, "runs/x/checkpoints", "runs/x/adapter")   # a PEFT adapter dir
    convert_from_hf(cfg, "llava-1.5-7b-hf", "ckpt/base")      # HF dir -> orbax params

A training checkpoint is rebuilt as `restore.model_from_checkpoint` does (its base from
`model.hf_path`, the adapters and trained modules restored). A merged export writes
safetensors + config.json + the processor files; an adapter export keeps the adapters unmerged
and writes adapter_config.json + adapter_model.safetensors as peft saves them
(`modules_to_save` for the modules `lora.trainable` trained, `base_model_name_or_path` =
model.hf_path, plus the base's processor files). Every out dir is written whole or not at all
(`hf.save_pretrained`, `restore.save_params_checkpoint`); callers guard what it may replace.
The mesh is `cfg.mesh` (`build_mesh`): set it to this machine's devices before calling.
"""
from __future__ import annotations

import os

from flax import nnx

from perpo_jax import storage
from perpo_jax.assemble import build_mesh
from perpo_jax.checkpoint import STATE_ITEM, Checkpointer
from perpo_jax.config import Config, ConfigError, config_from_dict, load_config
from perpo_jax.data.prepare import prepare_data
from perpo_jax.hf import CheckpointError, load_pretrained, save_pretrained
from perpo_jax.models.config import as_jnp_dtype
from perpo_jax.models.lora import LoRAParam
from perpo_jax.restore import is_params_checkpoint, model_from_checkpoint, save_params_checkpoint


def saved_config(checkpoint: str) -> dict:
    """The config saved with a training checkpoint (its root or one step dir); {} for a
    converted params checkpoint or when none was saved."""
    if is_params_checkpoint(checkpoint):
        return {}
    root, step = checkpoint, None
    name = os.path.basename(checkpoint.rstrip(os.sep))
    if name.isdigit() and storage.isdir(os.path.join(checkpoint, STATE_ITEM)):
        root, step = os.path.dirname(checkpoint), int(name)
    try:
        with Checkpointer(root, save_every=1, async_save=False, read_only=True) as ckpt:
            meta = ckpt.read_metadata(step) if ckpt.latest_step() is not None else {}
    except (FileNotFoundError, ValueError):
        meta = {}
    return meta.get("config", meta) if isinstance(meta, dict) else {}


def run_config(checkpoint: str, overrides=()) -> Config:
    """The config a training checkpoint was trained with (saved in its metadata), with dotted
    `overrides` on top; the schema defaults when it holds none (a converted checkpoint)."""
    try:
        return config_from_dict(saved_config(checkpoint), list(overrides))
    except ConfigError:  # the metadata is not a config: fall back to the defaults
        return load_config(None, list(overrides))


def export_merged(cfg: Config, checkpoint: str, out_dir: str, *, merge_lora: bool = True) -> str:
    """Training or converted checkpoint -> transformers dir `out_dir`; returns its absolute
    path. `merge_lora=False` (`convert --to-hf`) refuses a checkpoint that has adapters."""
    mesh = build_mesh(cfg)
    if is_params_checkpoint(checkpoint):
        return save_pretrained(model_from_checkpoint(cfg, checkpoint, mesh, None), out_dir,
                               source_dir=checkpoint)
    data = prepare_data(cfg)
    model = model_from_checkpoint(cfg, checkpoint, mesh, data.processor, merge_lora=merge_lora)
    if not merge_lora and nnx.state(model, LoRAParam):
        raise CheckpointError(f"{checkpoint} has LoRA adapters: use `perpo-jax export`, "
                              "which merges them into the base weights")
    return save_pretrained(model, out_dir, source_dir=cfg.model.hf_path or data.processor_dir)


def export_adapter(cfg: Config, checkpoint: str, out_dir: str) -> str:
    """The LoRA adapters of training checkpoint `checkpoint` as a PEFT adapter dir `out_dir`;
    returns its absolute path."""
    if is_params_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint} is a converted params checkpoint: it has no LoRA "
                              "adapters to export as a PEFT adapter")
    if not cfg.lora.enabled:
        raise CheckpointError(f"{checkpoint} was trained without LoRA (lora.enabled=false): "
                              "export it merged (perpo-jax export without --adapter)")
    if cfg.model.hf_path is None:
        raise CheckpointError("a PEFT adapter applies to a base model on disk, and this run's "
                              "base is the tiny random model (model.hf_path: null): export it "
                              "merged (perpo-jax export without --adapter)")
    data = prepare_data(cfg)
    model = model_from_checkpoint(cfg, checkpoint, build_mesh(cfg), data.processor,
                                  merge_lora=False)
    return save_pretrained(model, out_dir, adapter=True, trainable=cfg.lora.trainable,
                           base_model_name_or_path=cfg.model.hf_path,
                           source_dir=cfg.model.hf_path)


def convert_from_hf(cfg: Config, hf_dir: str, out_dir: str) -> str:
    """A transformers model dir -> an orbax params checkpoint `out_dir` (model.dtype, sharded
    over cfg.mesh); returns its absolute path."""
    model = load_pretrained(hf_dir, dtype=as_jnp_dtype(cfg.model.dtype), mesh=build_mesh(cfg))
    return save_params_checkpoint(model, out_dir, source_dir=hf_dir)
