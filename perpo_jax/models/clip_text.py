"""CLIP as transformers' CLIPModel computes it: the text tower, the vision tower (our
`vision.VisionTower`) and the two projections, for image–text similarity (M3PO's `clip` MAS).

Text tower: token + learned position embeddings -> causal encoder (the vision tower's block,
with a causal + padding mask) -> final LayerNorm -> the hidden state at the first EOS token
(the highest token id when the config's eos_token_id is the legacy 2, as HF does) ->
text_projection. Vision: class token after `post_layernorm` -> visual_projection. Logits:
exp(logit_scale) · cos(image, text), [B_images, B_texts] (HF `logits_per_image`).

The model only: loading it from an HF dir is `hf.load_pretrained`; the scorer with its
tokenizer, image processor and MAS calibration is `perpo_jax.mas.ClipScorer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from perpo_jax.models.config import VisionConfig, as_jnp_dtype
from perpo_jax.models.layers import LayerNorm, Linear, param
from perpo_jax.models.stack import scan_layers, stack_modules
from perpo_jax.models.vision import VisionBlock, VisionTower

@dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407
    dtype: str = "float32"
    param_dtype: str = "float32"

    def block_config(self) -> VisionConfig:
        """The same encoder block as the vision tower's (a VisionConfig carrying its widths)."""
        return VisionConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                            num_layers=self.num_layers, num_heads=self.num_heads, image_size=1,
                            patch_size=1, family="clip", layer_norm_eps=self.layer_norm_eps,
                            hidden_act=self.hidden_act, dtype=self.dtype,
                            param_dtype=self.param_dtype)


@dataclass(frozen=True)
class ClipConfig:
    text: ClipTextConfig
    vision: VisionConfig
    projection_dim: int = 512
    dtype: str = "float32"
    param_dtype: str = "float32"
    tie_word_embeddings: bool = False  # read by the HF loader; CLIP ties nothing

    def replace(self, **kw) -> "ClipConfig":
        return dataclasses.replace(self, **kw)


class ClipTextEmbeddings(nnx.Module):
    def __init__(self, cfg: ClipTextConfig, *, rngs: nnx.Rngs):
        pdt = as_jnp_dtype(cfg.param_dtype)
        self.token_embedding = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        self.position_embedding = param(rngs, (cfg.max_position_embeddings, cfg.hidden_size),
                                        ("positions", "embed"), pdt)


def _masked_block(block: VisionBlock, x, bias):
    """A vision block's computation with an additive attention bias [B, 1, T, T]."""
    attn = block.self_attn
    h = block.layer_norm1(x)
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    s = jnp.einsum("blnh,bmnh->bnlm", q, k, preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5 + bias
    probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    x = x + attn.out_proj(jnp.einsum("bnlm,bmnh->blnh", probs, v))
    return x + block.mlp(block.layer_norm2(x))


class ClipTextTower(nnx.Module):
    def __init__(self, cfg: ClipTextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = ClipTextEmbeddings(cfg, rngs=rngs)
        block = cfg.block_config()
        self.layers = stack_modules(lambda: VisionBlock(block, rngs=rngs), cfg.num_layers)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                          param_dtype=as_jnp_dtype(cfg.param_dtype))

    def __call__(self, input_ids, attention_mask=None):
        """input_ids [B, T] int, attention_mask [B, T] (1 = real) -> pooled [B, D] (EOS)."""
        cfg = self.config
        dt = as_jnp_dtype(cfg.dtype)
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"{t} text tokens > max_position_embeddings={cfg.max_position_embeddings}")
        x = (jnp.take(self.embeddings.token_embedding[...], input_ids, axis=0)
             + self.embeddings.position_embedding[...][:t][None]).astype(dt)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        x, _ = scan_layers(self.layers, lambda block, x, _: (_masked_block(block, x, bias), None), x)
        x = self.final_layer_norm(x)
        if cfg.eos_token_id == 2:  # legacy configs: EOS is the highest id (HF's rule)
            where = jnp.argmax(input_ids, axis=-1)
        else:
            where = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        return x[jnp.arange(b), where]


class ClipModel(nnx.Module):
    """transformers' CLIPModel: `text_embeds`, `image_embeds` (projected, not normalised),
    `logits(pixel_values, input_ids, attention_mask)` -> [B_images, B_texts]."""

    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt, pdt = as_jnp_dtype(cfg.dtype), as_jnp_dtype(cfg.param_dtype)
        self.text_model = ClipTextTower(cfg.text, rngs=rngs)
        self.vision_model = VisionTower(cfg.vision, rngs=rngs)
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        self.visual_projection = Linear(cfg.vision.hidden_size, cfg.projection_dim,
                                        kernel_axes=("vision_embed", None), **kw)
        self.text_projection = Linear(cfg.text.hidden_size, cfg.projection_dim,
                                      kernel_axes=("embed", None), **kw)
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, pdt))

    def text_embeds(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def image_embeds(self, pixel_values):
        cls = self.vision_model.hidden_states_at(pixel_values, [self.config.vision.num_layers])[0][:, 0]
        return self.visual_projection(self.vision_model.post_layernorm(cls))

    def cosine(self, pixel_values, input_ids, attention_mask=None):
        """[B_images, B_texts] float32 cosine similarities."""
        img = self.image_embeds(pixel_values).astype(jnp.float32)
        txt = self.text_embeds(input_ids, attention_mask).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return img @ txt.T

    def logits(self, pixel_values, input_ids, attention_mask=None):
        """HF `logits_per_image`: exp(logit_scale) · cosine, [B_images, B_texts]."""
        scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
        return scale * self.cosine(pixel_values, input_ids, attention_mask)


def build_clip(cfg: ClipConfig, *, rngs: nnx.Rngs) -> ClipModel:
    return ClipModel(cfg, rngs=rngs)
