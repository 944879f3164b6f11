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

from perpo_jax.models import anyres
from perpo_jax.models.config import LlavaConfig, LlavaNextConfig, TextConfig, as_jnp_dtype
from perpo_jax.models.decoder import DecoderLM
from perpo_jax.models.layers import Linear, activation, param
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
        picked = self.vision_tower.hidden_states_at(pixel_values_bchw, indices)
        if self.config.vision_feature_select_strategy == "default":
            picked = [s[:, 1:] for s in picked]
        return self.multi_modal_projector(jnp.concatenate(picked, axis=-1))

    def embed(self, input_ids_bt, pixel_values=None, image_sizes=None):
        """Token embeddings [B, T, D] with image features written at the image-token positions.

        pixel_values [B, C, H, W]; `image_sizes` is accepted (and ignored) so callers can treat
        every LLaVA kind alike.
        """
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

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                 positions=None):
        """input_ids [B, T] (image tokens expanded), pixel_values [B, C, H, W] (anyres:
        [B, N, C, H, W] with image_sizes [B, 2]) -> logits [B, T, V] f32."""
        embeds = self.embed(input_ids, pixel_values, image_sizes)
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


class LlavaNextModel(LlavaModel):
    """LLaVA-NeXT / OneVision: anyres tiles + `image_newline` [D] ("embed")."""

    def __init__(self, config: LlavaNextConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.image_newline = param(rngs, (config.text.hidden_size,), ("embed",),
                                   as_jnp_dtype(config.text.param_dtype))

    def tile_features(self, pixel_values_bnchw):
        """pixel_values [B, N, C, H, W] -> projected features [B, N, pp*pp, D] of every tile
        (zero padding tiles included: shapes are static; their features are never used)."""
        b, n = pixel_values_bnchw.shape[:2]
        feats = self.image_features(pixel_values_bnchw.reshape((b * n,) + pixel_values_bnchw.shape[2:]))
        return feats.reshape((b, n) + feats.shape[1:])

    def image_layout(self, pixel_values, image_sizes) -> dict:
        """Checked inputs -> per-image packing geometry (`anyres.packed_layout`, [B] each)."""
        cfg = self.config
        if pixel_values.ndim != 5:
            raise ValueError(f"{cfg.model_type} pixel_values must be [B, N_tiles, C, H, W], got "
                             f"shape {tuple(pixel_values.shape)}")
        if image_sizes is None:
            raise ValueError(f"{cfg.model_type} needs image_sizes [B, 2] (original height, "
                             "width) with pixel_values")
        image_sizes = jnp.asarray(image_sizes, jnp.int32)
        if image_sizes.shape != (pixel_values.shape[0], 2):
            raise ValueError(f"image_sizes shape {tuple(image_sizes.shape)} does not match "
                             f"pixel_values batch {pixel_values.shape[0]} (expected [B, 2])")
        layout = anyres.packed_layout(image_sizes, cfg.image_grid_pinpoints, cfg.vision.image_size,
                                      cfg.tile_patches, self._reduction_table())
        if not isinstance(layout["tiles"], jax.core.Tracer):
            needed = int(jnp.max(layout["tiles"]))
            if needed > pixel_values.shape[1]:
                raise ValueError(f"pixel_values has {pixel_values.shape[1]} tiles per image but "
                                 f"image_sizes need up to {needed}")
        return layout

    def _reduction_table(self):
        """OneVision's anyres_max_N grid-size table (None for NeXT)."""
        cfg = self.config
        if cfg.max_tiles_kept is None:
            return None
        return anyres.reduction_table(cfg.image_grid_pinpoints, cfg.vision.image_size,
                                      cfg.tile_patches, cfg.max_tiles_kept)

    def packed_image_features(self, pixel_values, image_sizes, layout=None):
        """pixel_values [B, N, C, H, W], image_sizes [B, 2] -> (packed [B, Lmax, D] float32,
        valid [B, Lmax] bool): each image's features in prompt order, a prefix of its row."""
        if layout is None:
            layout = self.image_layout(pixel_values, image_sizes)
        return anyres.pack_features(
            self.tile_features(pixel_values), self.image_newline[...], layout,
            self.config.max_image_tokens, self.config.tile_patches,
            interpolate=self.config.max_tiles_kept is not None)

    def embed(self, input_ids_bt, pixel_values=None, image_sizes=None):
        """Token embeddings [B, T, D]; image b's packed features fill the image tokens in order
        (row b's, when each row holds its own image's count)."""
        embeds = self.language_model.embed(input_ids_bt)
        if pixel_values is None:
            return embeds
        layout = self.image_layout(pixel_values, image_sizes)
        is_image = input_ids_bt == self.config.image_token_id
        if not isinstance(is_image, jax.core.Tracer):  # checked before the vision tower runs
            n_tokens = int(is_image.sum())
            lengths = [int(n) for n in layout["length"]]
            if n_tokens != sum(lengths):
                raise ValueError(
                    f"image features and image tokens do not match: {n_tokens} tokens of id "
                    f"{self.config.image_token_id} in input_ids, {sum(lengths)} feature vectors "
                    f"(per image: {lengths})")
        packed, valid = self.packed_image_features(pixel_values, image_sizes, layout)
        return anyres.scatter_features(embeds, is_image, packed, valid)


def build_model(config, *, rngs: nnx.Rngs):
    """TextConfig -> DecoderLM, LlavaConfig -> LlavaModel, LlavaNextConfig -> LlavaNextModel
    (random init from `rngs`)."""
    if isinstance(config, LlavaNextConfig):
        return LlavaNextModel(config, rngs=rngs)
    if isinstance(config, LlavaConfig):
        return LlavaModel(config, rngs=rngs)
    if isinstance(config, TextConfig):
        return DecoderLM(config, rngs=rngs)
    raise TypeError(f"no model for config type {type(config).__name__}")
