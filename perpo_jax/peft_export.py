"""`perpo-jax export --adapter`: a training checkpoint's LoRA adapters as a PEFT adapter dir.

    out = export_adapter(cfg, "runs/x/checkpoints", "runs/x/adapter")

The model is rebuilt from the checkpoint exactly as the merged export does (its base from
`model.hf_path`, the adapters and trained modules restored), but the adapters stay unmerged and
are written by `hf.save_pretrained(..., adapter=True)`: adapter_config.json +
adapter_model.safetensors as peft saves them, `modules_to_save` for the modules `lora.trainable`
trained, `base_model_name_or_path` = model.hf_path, plus the base's processor/tokenizer files.
"""
from __future__ import annotations

from perpo_jax.config import Config
from perpo_jax.data.prepare import prepare_data
from perpo_jax.hf import CheckpointError, save_pretrained
from perpo_jax.assemble import build_mesh
from perpo_jax.restore import is_params_checkpoint, model_from_checkpoint


def export_adapter(cfg: Config, checkpoint: str, out_dir: str) -> str:
    """Writes the PEFT adapter of training checkpoint `checkpoint` (run config `cfg`) to
    `out_dir` (replaced atomically; the caller guards it); returns the absolute out dir."""
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
