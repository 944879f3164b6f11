"""LLaVA: vision tower -> multi-modal projector -> image tokens of a decoder LM.

Matches transformers' LlavaForConditionalGeneration at base resolution: features are the
vision hidden state(s) at `vision_feature_layer` (concatenated when several), the first token
dropped for the "default" strategy, projected by linear_1 -> act -> linear_2 and written into
the positions of `image_token_id` in row-major order over the batch (torch `masked_scatter`:
the k-th image token of the flattened batch gets the k-th feature vector of the flattened
images), so a prompt the LlavaProcessor expanded gets image b's features in row b.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from perpo_jax.models.config import LlavaConfig, TextConfig, as_jnp_dtype
from perpo_jax.models.decoder import DecoderLM
from perpo_jax.models.layers import Linear, activation
from perpo_jax.models.vision import VisionTower


class Projector(nnx.Module):
    """linear_1 [Dv * n_layers, D] ("vision_embed","mlp") -> act -> linear_2 [D, D] ("mlp","embed")."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        kw = dict(
            use_bias=cfg.projector_bias,
            dtype=as_jnp_dtype(cfg.text.dtype),
            param_dtype=as_jnp_dtype(cfg.text.param_dtype),
            rngs=rngs,
        )
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        d = cfg.text.hidden_size
        self.linear_1 = Linear(d_in, d, kernel_axes=("vision_embed", "mlp"), **kw)
        self.linear_2 = Linear(d, d, kernel_axes=("mlp", "embed"), **kw)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(nnx.Module):
    """LLaVA with the same interface as DecoderLM (see docs/internals.md)."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = VisionTower(config.vision, rngs=rngs)
        self.multi_modal_projector = Projector(config, rngs=rngs)
        self.language_model = DecoderLM(config.text, rngs=rngs)

    def image_features(self, pixel_values_bchw):
        """pixel_values [B, C, H, W] -> projected features [B, num_image_tokens, D]."""
        n_states = self.config.vision.num_layers + 1
        for layer in self.config.feature_layers:
            if not -n_states <= layer < n_states:
                raise ValueError(f"vision_feature_layer {layer} out of range for {n_states} hidden states")
        indices = [layer % n_states for layer in self.config.feature_layers]
        states = self.vision_tower.hidden_states(pixel_values_bchw, upto=max(indices))
        picked = [states[i] for i in indices]
        if self.config.vision_feature_select_strategy == "default":
            picked = [s[:, 1:] for s in picked]
        return self.multi_modal_projector(jnp.concatenate(picked, axis=-1))

    def embed(self, input_ids_bt, pixel_values=None):
        """Token embeddings [B, T, D] with image features written at the image-token positions."""
        embeds = self.language_model.embed(input_ids_bt)
        if pixel_values is None:
            return embeds
        feats = self.image_features(pixel_values)
        feats_flat = feats.reshape(-1, feats.shape[-1]).astype(embeds.dtype)
        is_image = input_ids_bt == self.config.image_token_id
        if not isinstance(is_image, jax.core.Tracer):
            n_tokens, n_feats = int(is_image.sum()), feats_flat.shape[0]
            if n_tokens != n_feats:
                raise ValueError(
                    f"image features and image tokens do not match: {n_tokens} tokens of id "
                    f"{self.config.image_token_id} in input_ids, {n_feats} feature vectors "
                    f"({feats.shape[0]} image(s) x {feats.shape[1]})"
                )
        # k-th image token (row-major over the batch) takes feature row k: masked_scatter
        order = jnp.cumsum(is_image.reshape(-1)) - 1
        order = jnp.clip(order, 0, feats_flat.shape[0] - 1).reshape(is_image.shape)
        return jnp.where(is_image[..., None], feats_flat[order], embeds)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, positions=None):
        """input_ids [B, T] (image tokens expanded), pixel_values [B, C, H, W] -> logits [B, T, V] f32."""
        embeds = self.embed(input_ids, pixel_values)
        hidden, _ = self.language_model.prefill(embeds, attention_mask, positions)
        return self.language_model.logits(hidden)

    def prefill(self, embeds_btd, attention_mask_bt=None, positions_bt=None):
        return self.language_model.prefill(embeds_btd, attention_mask_bt, positions_bt)

    def extend(self, embeds_bgtd, positions_bgt, mask_bgt, prefix=None, cache=None, cache_index=None):
        return self.language_model.extend(embeds_bgtd, positions_bgt, mask_bgt, prefix, cache, cache_index)

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def init_cache(self, batch: int, groups: int, max_len: int):
        return self.language_model.init_cache(batch, groups, max_len)


def build_model(config, *, rngs: nnx.Rngs):
    """TextConfig -> DecoderLM, LlavaConfig -> LlavaModel (random init from `rngs`)."""
    if isinstance(config, LlavaConfig):
        return LlavaModel(config, rngs=rngs)
    if isinstance(config, TextConfig):
        return DecoderLM(config, rngs=rngs)
    raise TypeError(f"no model for config type {type(config).__name__}")
