"""The ONE table per architecture: our parameter path <-> Hugging Face key + transform.

Keys are in the canonical layout transformers 5 writes on `save_pretrained`:
  plain LM:  `model.layers.N...`, `model.embed_tokens.weight`, `lm_head.weight`
  LLaVA:     `language_model.model.layers.N...`, `language_model.lm_head.weight`,
             `vision_tower.encoder...`, `multi_modal_projector.linear_{1,2}...`
             (+ `image_newline` for LLaVA-NeXT / OneVision)
Other LLaVA layouts are mapped onto this one by `canonical_key` on import.

Transforms (`kind`), with HF torch layouts on the left:
  linear: weight [prod(out), prod(in)]  <->  kernel [*in, *out]   (transpose + reshape)
  bias:   [prod(out)]                   <->  [*out]                (reshape)
  conv:   [D, C, p, p]                  <->  [p, p, C, D]          (patch embedding)
  copy:   same shape both ways (norms, embeddings, class token, probe)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perpo_jax.models.clip_text import ClipConfig
from perpo_jax.models.config import LlavaConfig, LlavaNextConfig, TextConfig, VisionConfig


@dataclass(frozen=True)
class Entry:
    path: tuple  # path of the nnx.Param in the model's state, e.g. ("layers", "mlp", ...)
    key: str  # canonical HF key
    kind: str  # "linear" | "bias" | "conv" | "copy"
    n_in: int = 1  # number of leading input dims of our kernel ("linear" only)
    # layer i of a stacked tower: the HF tensor is slice [i] of our [L, ...] parameter
    layer: int | None = None


def layer_shape(entry: Entry, param_shape: tuple) -> tuple:
    """Shape of the part of our parameter an entry maps: one layer's slice or the whole."""
    return tuple(param_shape[1:]) if entry.layer is not None else tuple(param_shape)


def hf_shape(entry: Entry, our_shape: tuple) -> tuple:
    """Shape the HF tensor must have for a parameter of `our_shape`."""
    if entry.kind == "linear":
        return (math.prod(our_shape[entry.n_in:]), math.prod(our_shape[: entry.n_in]))
    if entry.kind == "bias":
        return (math.prod(our_shape),)
    if entry.kind == "conv":
        p1, p2, c, d = our_shape
        return (d, c, p1, p2)
    return tuple(our_shape)


def to_ours(entry: Entry, array: np.ndarray, our_shape: tuple) -> np.ndarray:
    """HF tensor -> our layout (numpy; caller checked the shape with `hf_shape`)."""
    if entry.kind == "linear":
        return np.ascontiguousarray(array.T).reshape(our_shape)
    if entry.kind == "bias":
        return array.reshape(our_shape)
    if entry.kind == "conv":
        return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
    return array


def to_hf(entry: Entry, array: np.ndarray) -> np.ndarray:
    """Our layout -> HF tensor (numpy)."""
    if entry.kind == "linear":
        n_in = math.prod(array.shape[: entry.n_in])
        return np.ascontiguousarray(array.reshape(n_in, -1).T)
    if entry.kind == "bias":
        return array.reshape(-1)
    if entry.kind == "conv":
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    return array


def _linear(path, key, bias: bool, n_in: int = 1, layer: int | None = None) -> list[Entry]:
    out = [Entry(path + ("kernel",), key + ".weight", "linear", n_in, layer)]
    if bias:
        out.append(Entry(path + ("bias",), key + ".bias", "bias", layer=layer))
    return out


def _layer_norm(path, key, layer: int | None = None) -> list[Entry]:
    return [
        Entry(path + ("scale",), key + ".weight", "copy", layer=layer),
        Entry(path + ("bias",), key + ".bias", "copy", layer=layer),
    ]


def text_entries(cfg: TextConfig, ours: tuple = (), model: str = "model.", head: str = "lm_head.weight"):
    """Decoder LM table; `model` is the HF prefix of the body, `head` the lm_head key."""
    e = [Entry(ours + ("embed_tokens", "embedding"), f"{model}embed_tokens.weight", "copy")]
    p = ours + ("layers",)  # the stacked blocks: HF layer i is slice i
    for i in range(cfg.num_layers):
        k = f"{model}layers.{i}."
        e.append(Entry(p + ("input_layernorm", "scale"), k + "input_layernorm.weight", "copy", layer=i))
        for name in ("q_proj", "k_proj", "v_proj"):
            e += _linear(p + ("self_attn", name), k + f"self_attn.{name}", cfg.qkv_bias, layer=i)
        e += _linear(p + ("self_attn", "o_proj"), k + "self_attn.o_proj", cfg.o_bias, n_in=2, layer=i)
        e.append(Entry(p + ("post_attention_layernorm", "scale"),
                       k + "post_attention_layernorm.weight", "copy", layer=i))
        for name in ("gate_proj", "up_proj", "down_proj"):
            e += _linear(p + ("mlp", name), k + f"mlp.{name}", cfg.mlp_bias, layer=i)
    e.append(Entry(ours + ("norm", "scale"), f"{model}norm.weight", "copy"))
    if not cfg.tie_word_embeddings:
        e.append(Entry(ours + ("lm_head", "kernel"), head, "linear"))
    return e


def _encoder_layers(p: tuple, k: str, num_layers: int) -> list[Entry]:
    """The stacked pre-LN layers (at our path `p`) as CLIP's and SigLIP's towers (vision and
    text) name them: HF `{k}{i}.…` is slice i."""
    e = []
    for i in range(num_layers):
        ki = f"{k}{i}."
        e += _layer_norm(p + ("layer_norm1",), ki + "layer_norm1", i)
        for name in ("q_proj", "k_proj", "v_proj"):
            e += _linear(p + ("self_attn", name), ki + f"self_attn.{name}", True, layer=i)
        e += _linear(p + ("self_attn", "out_proj"), ki + "self_attn.out_proj", True, n_in=2, layer=i)
        e += _layer_norm(p + ("layer_norm2",), ki + "layer_norm2", i)
        e += _linear(p + ("mlp", "fc1"), ki + "mlp.fc1", True, layer=i)
        e += _linear(p + ("mlp", "fc2"), ki + "mlp.fc2", True, layer=i)
    return e


def vision_entries(cfg: VisionConfig, ours: tuple = ("vision_tower",), hf: str = "vision_tower."):
    """CLIP / SigLIP vision tower table (v5 layout: no `vision_model.` level)."""
    emb = ours + ("embeddings",)
    e = [
        Entry(emb + ("patch_embedding", "kernel"), f"{hf}embeddings.patch_embedding.weight", "conv"),
        Entry(emb + ("position_embedding",), f"{hf}embeddings.position_embedding.weight", "copy"),
    ]
    if cfg.family == "clip":
        e.append(Entry(emb + ("class_embedding",), f"{hf}embeddings.class_embedding", "copy"))
        e += _layer_norm(ours + ("pre_layrnorm",), f"{hf}pre_layrnorm")
    else:
        e.append(Entry(emb + ("patch_embedding", "bias"), f"{hf}embeddings.patch_embedding.bias", "copy"))
    e += _encoder_layers(ours + ("layers",), f"{hf}encoder.layers.", cfg.num_layers)
    e += _layer_norm(ours + ("post_layernorm",), f"{hf}post_layernorm")
    if cfg.family == "siglip" and cfg.use_head:
        h, k = ours + ("head",), f"{hf}head."
        e.append(Entry(h + ("probe",), k + "probe", "copy"))
        e.append(Entry(h + ("in_proj", "kernel"), k + "attention.in_proj_weight", "linear"))
        e.append(Entry(h + ("in_proj", "bias"), k + "attention.in_proj_bias", "bias"))
        e += _linear(h + ("out_proj",), k + "attention.out_proj", True)
        e += _layer_norm(h + ("layernorm",), k + "layernorm")
        e += _linear(h + ("mlp", "fc1"), k + "mlp.fc1", True)
        e += _linear(h + ("mlp", "fc2"), k + "mlp.fc2", True)
    return e


def llava_entries(cfg: LlavaConfig) -> list[Entry]:
    e = text_entries(
        cfg.text, ("language_model",), "language_model.model.", "language_model.lm_head.weight"
    )
    e += vision_entries(cfg.vision)
    for name in ("linear_1", "linear_2"):
        e += _linear(("multi_modal_projector", name), f"multi_modal_projector.{name}", cfg.projector_bias)
    if isinstance(cfg, LlavaNextConfig):  # NeXT / OneVision: one learned row separator [D]
        e.append(Entry(("image_newline",), "image_newline", "copy"))
    return e


def clip_entries(cfg) -> list[Entry]:
    """transformers' CLIPModel: text tower, vision tower, both projections, logit_scale."""
    t, k = ("text_model",), "text_model."
    e = [Entry(t + ("embeddings", "token_embedding"), f"{k}embeddings.token_embedding.weight", "copy"),
         Entry(t + ("embeddings", "position_embedding"), f"{k}embeddings.position_embedding.weight",
               "copy")]
    e += _encoder_layers(t + ("layers",), f"{k}encoder.layers.", cfg.text.num_layers)
    e += _layer_norm(t + ("final_layer_norm",), f"{k}final_layer_norm")
    e += vision_entries(cfg.vision, ("vision_model",), "vision_model.")
    e += _linear(("visual_projection",), "visual_projection", False)
    e += _linear(("text_projection",), "text_projection", False)
    e.append(Entry(("logit_scale",), "logit_scale", "copy"))
    return e


def entries_for(config) -> list[Entry]:
    """The table for a model config (TextConfig -> plain causal LM, LlavaConfig -> LLaVA,
    ClipConfig -> CLIPModel)."""
    if isinstance(config, ClipConfig):
        return clip_entries(config)
    if isinstance(config, LlavaConfig):
        return llava_entries(config)
    if isinstance(config, TextConfig):
        return text_entries(config)
    raise TypeError(f"no HF mapping for config type {type(config).__name__}")


# Buffers some checkpoints carry that are not parameters (safe to skip on import).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")


def canonical_key(key: str, is_llava: bool) -> str:
    """Maps the three LLaVA layouts (v5 fresh save, hub/v4, in-memory `model.`) onto the v5 one
    (LLaVA-NeXT / OneVision alike; their `image_newline` sits at the top level)."""
    if not is_llava:
        return key
    for old, new in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key == "lm_head.weight":
        key = "language_model.lm_head.weight"
    if key.startswith("vision_tower.vision_model."):
        key = "vision_tower." + key[len("vision_tower.vision_model."):]
    return key
