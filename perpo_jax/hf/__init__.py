"""Hugging Face import/export: the only place that knows HF key names and config fields."""

from perpo_jax.hf.errors import AnyresNotSupportedError, CheckpointError
from perpo_jax.hf.load import load_pretrained, read_config
from perpo_jax.hf.save import save_pretrained

__all__ = ["AnyresNotSupportedError", "CheckpointError", "load_pretrained", "read_config", "save_pretrained"]
