"""Tiny random transformers (PyTorch) models for parity tests, built offline in float32."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf

VOCAB = 256
IMAGE_TOKEN = 255


def llama_config(**kw) -> tf.LlamaConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return tf.LlamaConfig(**base)


def qwen2_config(**kw) -> tf.Qwen2Config:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    base.update(kw)
    return tf.Qwen2Config(**base)


def clip_config(**kw) -> tf.CLIPVisionConfig:
    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    base.update(kw)
    return tf.CLIPVisionConfig(**base)


def siglip_config(**kw) -> tf.SiglipVisionConfig:
    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    base.update(kw)
    return tf.SiglipVisionConfig(**base)


def _randomize(model: torch.nn.Module, seed: int):
    """Random normal weights everywhere (HF init leaves biases/norms at 0/1; we want them live)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_scale else 0.0))
    return model


def causal_lm(config, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return _randomize(model, seed)


def llava(text_config, vision_config, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tf.LlavaConfig(
        text_config=text_config, vision_config=vision_config, image_token_index=IMAGE_TOKEN, **kw
    )
    model = tf.LlavaForConditionalGeneration(cfg).eval().float()
    return _randomize(model, seed)


def num_image_tokens(model) -> int:
    """Image tokens one image expands to, as the processor would (+1 CLS for CLIP 'full')."""
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if vc.model_type == "clip_vision_model":
        n += 1
        if model.config.vision_feature_select_strategy == "default":
            n -= 1
    return n


def llava_inputs(model, batch: int = 2, before: int = 3, after: int = 4, seed: int = 0):
    """input_ids [B, T] with the image token expanded, pixel_values [B, 3, H, W] float32."""
    rng = np.random.default_rng(seed)
    n_img = num_image_tokens(model)
    rows = []
    for _ in range(batch):
        pre = rng.integers(1, IMAGE_TOKEN - 1, size=before)
        post = rng.integers(1, IMAGE_TOKEN - 1, size=after)
        rows.append(np.concatenate([pre, np.full(n_img, IMAGE_TOKEN), post]))
    ids = np.stack(rows).astype(np.int64)
    size = model.config.vision_config.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids, pixels


def hf_logits(model, ids, attention_mask=None, pixel_values=None) -> np.ndarray:
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if pixel_values is not None:
        kw["pixel_values"] = torch.tensor(np.array(pixel_values))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.array(ids), dtype=torch.long), **kw)
    return out.logits.float().numpy()
