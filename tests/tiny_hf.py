"""Tiny random transformers (PyTorch) models for parity tests, built offline in float32."""

from __future__ import annotations

import json
import os

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


# ----------------------------------------------------------------------------- anyres (NeXT / OneVision)

# 16 px tiles, patch 4: 4 x 4 features per tile; grids up to 3 tiles on a side.
NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]
ONEVISION_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32], [16, 48], [48, 16], [32, 48],
                       [48, 32], [48, 48]]


def llava_next(text_config=None, vision_config=None, seed: int = 0, **kw):
    """LLaVA-NeXT: Llama + CLIP (16 px, patch 4), "default" strategy, layer -2."""
    torch.manual_seed(seed)
    cfg = tf.LlavaNextConfig(
        text_config=text_config or llama_config(),
        vision_config=vision_config or clip_config(image_size=16, patch_size=4),
        image_token_index=kw.pop("image_token_index", IMAGE_TOKEN),
        image_grid_pinpoints=kw.pop("image_grid_pinpoints", NEXT_PINPOINTS), **kw)
    model = tf.LlavaNextForConditionalGeneration(cfg).eval().float()
    return _randomize(model, seed)


def llava_onevision(text_config=None, vision_config=None, seed: int = 0, **kw):
    """LLaVA-OneVision: Qwen2 (tied) + SigLIP (16 px, patch 4, with head), "full", layer -1,
    anyres_max_2 so grids of more than ~2 tiles' features are shrunk bilinearly."""
    torch.manual_seed(seed)
    cfg = tf.LlavaOnevisionConfig(
        text_config=text_config or qwen2_config(),
        vision_config=vision_config or siglip_config(image_size=16, patch_size=4,
                                                     vision_use_head=True),
        image_token_index=kw.pop("image_token_index", IMAGE_TOKEN),
        image_grid_pinpoints=kw.pop("image_grid_pinpoints", ONEVISION_PINPOINTS),
        vision_aspect_ratio=kw.pop("vision_aspect_ratio", "anyres_max_2"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, **kw)
    model = tf.LlavaOnevisionForConditionalGeneration(cfg).eval().float()
    return _randomize(model, seed)


def anyres_feature_lengths(model, pixel_values, image_sizes) -> list[int]:
    """Image tokens transformers' model produces per image (its packed feature lengths)."""
    with torch.no_grad():
        out = model.model.get_image_features(torch.tensor(np.asarray(pixel_values)),
                                             torch.tensor(np.asarray(image_sizes)))
    return [int(f.shape[0]) for f in out.pooler_output]


def anyres_inputs(model, image_sizes, max_tiles: int, before: int = 3, after: int = 4,
                  seed: int = 0):
    """(input_ids [B, T], pixel_values [B, max_tiles, 3, S, S] f32, image_sizes [B, 2] int64):
    each row's image token expanded to transformers' feature count for its image; rows padded
    on the right with token 0 (give the mask) to the longest. Unused tiles hold noise, which
    must not matter."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(image_sizes, np.int64)
    s = model.config.vision_config.image_size
    pixels = rng.standard_normal((len(sizes), max_tiles, 3, s, s)).astype(np.float32)
    counts = anyres_feature_lengths(model, pixels, sizes)
    rows = [np.concatenate([rng.integers(1, IMAGE_TOKEN - 1, size=before), np.full(n, IMAGE_TOKEN),
                            rng.integers(1, IMAGE_TOKEN - 1, size=after)]) for n in counts]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask, pixels, sizes


def hf_anyres_logits(model, ids, attention_mask, pixel_values, image_sizes) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                    attention_mask=torch.tensor(np.asarray(attention_mask), dtype=torch.long),
                    pixel_values=torch.tensor(np.asarray(pixel_values)),
                    image_sizes=torch.tensor(np.asarray(image_sizes)))
    return out.logits.float().numpy()


def save_onevision_dir(out: str, tokenizer, chat_template: str | None = None) -> str:
    """A OneVision checkpoint dir laid out as the hub has them: preprocessor_config.json
    (16 px tiles, ONEVISION_PINPOINTS), processor_config.json (16 features per tile, "full",
    anyres_max_2), the tokenizer, chat_template.jinja when given, and a tiny random
    LlavaOnevisionForConditionalGeneration over the tokenizer's vocabulary (transformers'
    LlavaOnevisionProcessor itself cannot save without a video processor, i.e. torchvision)."""
    tokenizer.save_pretrained(out)
    tf.LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, image_grid_pinpoints=ONEVISION_PINPOINTS,
        image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
                   "vision_feature_select_strategy": "full",
                   "vision_aspect_ratio": "anyres_max_2"}, f)
    if chat_template is not None:
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:
            f.write(chat_template)
    llava_onevision(qwen2_config(vocab_size=len(tokenizer)),
                    image_token_index=tokenizer.convert_tokens_to_ids("<image>")).save_pretrained(out)
    return out
