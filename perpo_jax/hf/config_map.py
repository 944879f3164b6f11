"""HF `config.json` dict <-> our config dataclasses (both directions).

Reads transformers-5 configs (`rope_parameters: {rope_theta, rope_type, ...}`) and hub/v4
configs (top-level `rope_theta`, `rope_scaling`); writes transformers-5 form.
"""

from __future__ import annotations

from typing import Any

from perpo_jax.hf.errors import AnyresNotSupportedError, CheckpointError
from perpo_jax.models.clip_text import ClipConfig, ClipTextConfig
from perpo_jax.models.config import (LlavaConfig, LlavaNextConfig, RopeScaling, TextConfig,
                                     VisionConfig)

TEXT_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
SUPPORTED_ANYRES = ("llava_next", "llava_onevision")
ANYRES_TYPES = SUPPORTED_ANYRES + ("llava_next_video",)

# transformers' config-class defaults: hub (v4) configs omit fields equal to them (e.g.
# llava-1.5's text_config has no hidden_size), so a missing field means this value.
_COMMON_TEXT = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
    rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
)
HF_DEFAULTS = {
    "llama": dict(_COMMON_TEXT, vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048),
    "qwen2": dict(_COMMON_TEXT, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768),
    "clip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
        hidden_act="quick_gelu", projection_dim=512,
    ),
    "siglip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", vision_use_head=True,
    ),
}
# LlavaConfig's vision tower when config.json has no vision_config (CLIP ViT-L/14 at 336 px)
LLAVA_DEFAULT_VISION = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
)
# transformers' LlavaNextConfig / LlavaOnevisionConfig defaults for fields a config may omit
MULTIMODAL_DEFAULTS = {
    "llava": dict(text="llama", vision=LLAVA_DEFAULT_VISION, layer=-2, strategy="default"),
    "llava_next": dict(
        text="llama", vision=LLAVA_DEFAULT_VISION, layer=-2, strategy="default",
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
    "llava_onevision": dict(
        text="qwen2", layer=-1, strategy="full",
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                    patch_size=14, image_size=384, num_hidden_layers=26, num_attention_heads=16,
                    vision_use_head=False),
        pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]),
}


def with_defaults(d: dict, model_type: str) -> dict:
    """`d` with transformers' defaults for `model_type` filled in where a key is absent/None."""
    out = dict(HF_DEFAULTS.get(model_type, {}))
    out.update({k: v for k, v in d.items() if v is not None})
    out["model_type"] = model_type
    return out


def _rope_from_hf(d: dict, where: str) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling = d.get("rope_theta", 10000.0), d.get("rope_scaling")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling("linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), RopeScaling(
            "llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise CheckpointError(
        f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def text_config_from_hf(d: dict, dtype: str = "float32", where: str = "config.json") -> TextConfig:
    family = d.get("model_type", "llama")
    if family not in TEXT_ARCH:
        raise CheckpointError(
            f"{where}: text model_type {family!r} is not supported (supported: {sorted(TEXT_ARCH)})"
        )
    if family == "qwen2" and d.get("use_sliding_window"):
        raise CheckpointError(f"{where}: Qwen2 use_sliding_window=true is not supported")
    d = with_defaults(d, family)
    theta, scaling = _rope_from_hf(d, where)
    heads = int(d["num_attention_heads"])
    attn_bias = bool(d.get("attention_bias", False))
    return TextConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        family=family,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d["max_position_embeddings"]),
        qkv_bias=True if family == "qwen2" else attn_bias,
        o_bias=False if family == "qwen2" else attn_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        hidden_act=d.get("hidden_act", "silu"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def vision_config_from_hf(d: dict, dtype: str = "float32", where: str = "config.json") -> VisionConfig:
    model_type = d.get("model_type", "clip_vision_model")
    if model_type not in VISION_TYPES:
        raise CheckpointError(
            f"{where}: vision model_type {model_type!r} is not supported "
            f"(supported: {sorted(VISION_TYPES)})"
        )
    family = VISION_TYPES[model_type]
    clip = family == "clip"
    d = with_defaults(d, model_type)
    return VisionConfig(
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=int(d["num_attention_heads"]),
        image_size=int(d["image_size"]),
        patch_size=int(d["patch_size"]),
        family=family,
        num_channels=int(d.get("num_channels", 3)),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
        hidden_act=d.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh"),
        use_head=False if clip else bool(d.get("vision_use_head", True)),
        projection_dim=d.get("projection_dim") if clip else None,
        dtype=dtype,
        param_dtype=dtype,
    )


# transformers' CLIPTextConfig / CLIPConfig defaults (hub configs omit fields equal to them)
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                          num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)


def clip_config_from_hf(d: dict, dtype: str = "float32", where: str = "config.json"):
    """A CLIPModel config.json dict -> ClipConfig (text + vision towers, projections)."""
    t = dict(CLIP_TEXT_DEFAULTS)
    t.update({k: v for k, v in (d.get("text_config") or {}).items() if v is not None})
    vision = dict(d.get("vision_config") or {})
    vision["model_type"] = "clip_vision_model"
    return ClipConfig(
        text=ClipTextConfig(
            vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]), num_layers=int(t["num_hidden_layers"]),
            num_heads=int(t["num_attention_heads"]),
            max_position_embeddings=int(t["max_position_embeddings"]),
            layer_norm_eps=float(t["layer_norm_eps"]), hidden_act=t["hidden_act"],
            eos_token_id=int(t["eos_token_id"]), dtype=dtype, param_dtype=dtype),
        vision=vision_config_from_hf(vision, dtype, where + ":vision_config"),
        projection_dim=int(d.get("projection_dim") or 512), dtype=dtype, param_dtype=dtype)


def config_from_hf(d: dict, dtype: str = "float32", where: str = "config.json"):
    """config.json dict -> TextConfig (plain causal LM), LlavaConfig, LlavaNextConfig (NeXT /
    OneVision) or ClipConfig."""
    model_type = d.get("model_type")
    if model_type == "clip":
        return clip_config_from_hf(d, dtype, where)
    if model_type in ANYRES_TYPES and model_type not in SUPPORTED_ANYRES:
        raise AnyresNotSupportedError(
            f"{where}: model_type {model_type!r} (anyres video tiling) is not supported; "
            f"supported multimodal types: llava, {', '.join(SUPPORTED_ANYRES)}"
        )
    if model_type in TEXT_ARCH:
        return text_config_from_hf(d, dtype, where)
    if model_type not in MULTIMODAL_DEFAULTS:
        raise CheckpointError(
            f"{where}: unsupported architecture model_type={model_type!r} "
            f"(architectures={d.get('architectures')}); supported: "
            f"{', '.join(MULTIMODAL_DEFAULTS)}, llama, qwen2"
        )
    if model_type == "llava" and d.get("image_grid_pinpoints"):
        raise AnyresNotSupportedError(
            f"{where}: model_type 'llava' with image_grid_pinpoints (anyres tiling) is not a "
            "transformers architecture; use model_type 'llava_next' or 'llava_onevision'"
        )
    return _multimodal_config_from_hf(d, model_type, dtype, where)


def _multimodal_config_from_hf(d: dict, model_type: str, dtype: str, where: str) -> LlavaConfig:
    """A llava / llava_next / llava_onevision config.json dict -> LlavaConfig / LlavaNextConfig."""
    defaults = MULTIMODAL_DEFAULTS[model_type]
    text_d = dict(d.get("text_config") or {})
    text_d.setdefault("model_type", defaults["text"])
    if d.get("tie_word_embeddings"):
        text_d["tie_word_embeddings"] = True
    token = d.get("image_token_index", d.get("image_token_id"))
    if token is None:
        raise CheckpointError(f"{where}: {model_type} config has no image_token_index / image_token_id")
    layer = d.get("vision_feature_layer", defaults["layer"])
    common = dict(
        text=text_config_from_hf(text_d, dtype, where + ":text_config"),
        vision=vision_config_from_hf(
            d.get("vision_config") or defaults["vision"], dtype, where + ":vision_config"
        ),
        image_token_id=int(token),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        projector_bias=bool(d.get("multimodal_projector_bias", True)),
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", defaults["strategy"]),
        dtype=dtype,
        param_dtype=dtype,
    )
    if model_type == "llava":
        return LlavaConfig(**common)
    pinpoints = d.get("image_grid_pinpoints") or defaults["pinpoints"]
    try:
        return LlavaNextConfig(
            **common,
            model_type=model_type,
            image_grid_pinpoints=tuple(tuple(p) for p in pinpoints),
            vision_aspect_ratio=(d.get("vision_aspect_ratio", "anyres_max_9")
                                 if model_type == "llava_onevision" else None),
            video_token_id=(d.get("video_token_index", d.get("video_token_id"))
                            if model_type == "llava_onevision" else None),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------- export


def _rope_to_hf(cfg: TextConfig) -> dict:
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    s = cfg.rope_scaling
    if s is not None:
        params.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            params.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    return params


def text_config_to_hf(cfg: TextConfig, with_arch: bool = True) -> dict:
    if cfg.family == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise CheckpointError("a qwen2 TextConfig must have qkv_bias=True, o_bias=False, mlp_bias=False")
    if cfg.family == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError("a llama TextConfig needs qkv_bias == o_bias (HF attention_bias)")
    d: dict[str, Any] = {
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": _rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": cfg.param_dtype,
    }
    if cfg.family == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    if with_arch:
        d["architectures"] = [TEXT_ARCH[cfg.family]]
    return d


def vision_config_to_hf(cfg: VisionConfig) -> dict:
    d: dict[str, Any] = {
        "model_type": "clip_vision_model" if cfg.family == "clip" else "siglip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
    }
    if cfg.family == "clip" and cfg.projection_dim is not None:
        d["projection_dim"] = cfg.projection_dim
    if cfg.family == "siglip":
        d["vision_use_head"] = cfg.use_head
    return d


def config_to_hf(config) -> dict:
    """Our config -> config.json dict (transformers-5 form, with `architectures`)."""
    if isinstance(config, TextConfig):
        return text_config_to_hf(config)
    if not isinstance(config, LlavaConfig):
        raise CheckpointError(f"cannot export a model with config type {type(config).__name__}")
    layer = config.vision_feature_layer
    out = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text_config_to_hf(config.text, with_arch=False),
        "vision_config": vision_config_to_hf(config.vision),
        "image_token_index": config.image_token_id,
        "image_seq_length": config.num_image_tokens,
        "projector_hidden_act": config.projector_hidden_act,
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "dtype": config.param_dtype,
    }
    if isinstance(config, LlavaNextConfig):
        out.update(anyres_config_to_hf(config))
        if config.model_type == "llava_onevision":  # not a LlavaOnevisionConfig field
            del out["image_seq_length"]
    return out


def anyres_config_to_hf(config: LlavaNextConfig) -> dict:
    """The LLaVA-NeXT / OneVision fields of config.json (over the llava ones)."""
    out: dict[str, Any] = {
        "model_type": config.model_type,
        "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
    }
    if config.model_type == "llava_next":
        out["architectures"] = ["LlavaNextForConditionalGeneration"]
        return out
    out["architectures"] = ["LlavaOnevisionForConditionalGeneration"]
    out["vision_aspect_ratio"] = config.vision_aspect_ratio
    if config.video_token_id is not None:
        out["video_token_index"] = config.video_token_id
    return out
