"""Hugging Face import/export: the only place that knows HF key names and config fields."""

from perpo_jax.hf.errors import AnyresNotSupportedError, CheckpointError
from perpo_jax.hf.load import load_pretrained, read_config
from perpo_jax.hf.peft_adapter import AdapterError, load_adapter, resolve_lora
from perpo_jax.hf.save import save_pretrained

__all__ = ["AdapterError", "AnyresNotSupportedError", "CheckpointError", "load_adapter",
           "load_pretrained", "read_config", "resolve_lora", "save_pretrained"]
