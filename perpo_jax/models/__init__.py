"""Flax NNX ports of LLaVA (Llama + CLIP, Qwen2 + SigLIP) and their decoder LMs."""

from perpo_jax.models.config import (
    LlavaConfig,
    LlavaNextConfig,
    RopeScaling,
    TextConfig,
    VisionConfig,
    tiny_llava_config,
)
from perpo_jax.models.decoder import DecoderLM, GroupCache, PrefixKV, grouped_attention
from perpo_jax.models.layers import Linear
from perpo_jax.models.llava import LlavaModel, LlavaNextModel, Projector, build_model
from perpo_jax.models.vision import VisionTower

__all__ = [
    "DecoderLM",
    "GroupCache",
    "Linear",
    "LlavaConfig",
    "LlavaModel",
    "LlavaNextConfig",
    "LlavaNextModel",
    "PrefixKV",
    "Projector",
    "RopeScaling",
    "TextConfig",
    "VisionConfig",
    "VisionTower",
    "build_model",
    "grouped_attention",
    "tiny_llava_config",
]
