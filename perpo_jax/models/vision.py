"""ViT image encoders as transformers' CLIPVisionModel / SiglipVisionModel compute them.

CLIP: conv patches (no bias) + class token + learned positions -> pre_layrnorm -> encoder.
SigLIP: conv patches (bias) + learned positions -> encoder (no class token, no pre-LN).
Hidden state i is the encoder input (i = 0) or the output of layer i, as HF's
`output_hidden_states` (CLIP's `post_layernorm` pools the class token and SigLIP's applies
to `last_hidden_state`: neither touches those hidden states, so LLaVA never uses them, but
they are kept for exact import/export, as is SigLIP's attention-pooling `head`).

Shapes: B images, C channels, p patch, Np patches, L tokens (Np, +1 for CLIP), D width,
N heads, H head dim, F mlp width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from perpo_jax.models.config import VisionConfig, as_jnp_dtype
from perpo_jax.models.layers import LayerNorm, Linear, activation, param
from perpo_jax.models.stack import scan_layers, stack_modules

_VEMBED = "vision_embed"


class PatchKernel(nnx.Module):
    """Conv patch-embedding weights: kernel [p, p, C, D], bias [D] or None."""

    def __init__(self, p: int, c: int, d: int, use_bias: bool, pdt, rngs: nnx.Rngs):
        self.kernel = param(rngs, (p, p, c, d), ("patch", "patch", "channels", _VEMBED), pdt)
        self.bias = param(rngs, (d,), (_VEMBED,), pdt, init="zeros") if use_bias else None


class VisionEmbeddings(nnx.Module):
    """Patch embedding kernel [p, p, C, D] ("patch","patch","channels","vision_embed"),
    positions [L, D], CLIP class token [D]."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = as_jnp_dtype(cfg.param_dtype)
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_embedding = PatchKernel(p, c, d, cfg.family == "siglip", pdt, rngs)
        self.class_embedding = (
            param(rngs, (d,), (_VEMBED,), pdt) if cfg.family == "clip" else None
        )
        self.position_embedding = param(rngs, (cfg.num_positions, d), ("positions", _VEMBED), pdt)

    def __call__(self, pixel_values_bchw):
        """pixel_values [B, C, Hpx, Wpx] (HF processor output, NCHW) -> tokens [B, L, D]."""
        cfg = self.cfg
        dt = as_jnp_dtype(cfg.dtype)
        b, c, hpx, wpx = pixel_values_bchw.shape
        if (hpx, wpx) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
            raise ValueError(
                f"pixel_values shape {pixel_values_bchw.shape} does not match the vision config "
                f"(channels={cfg.num_channels}, image_size={cfg.image_size})"
            )
        p = cfg.patch_size
        gh, gw = hpx // p, wpx // p
        # a stride-p, kernel-p convolution is a matmul over non-overlapping patches
        # the conv ignores pixels beyond the last whole patch (e.g. 384 px with patch 14)
        x = pixel_values_bchw[:, :, : gh * p, : gw * p].astype(dt).reshape(b, c, gh, p, gw, p)
        kernel = self.patch_embedding.kernel[...].astype(dt)
        x = jnp.einsum("bcipjq,pqcd->bijd", x, kernel).reshape(b, gh * gw, -1)
        if self.patch_embedding.bias is not None:
            x = x + self.patch_embedding.bias[...].astype(dt)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding[...].astype(dt)[None]


class VisionAttention(nnx.Module):
    """Bidirectional multi-head attention; q/k/v [D, N, H], out [N, H, D], all with bias."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(
            use_bias=True,
            dtype=as_jnp_dtype(cfg.dtype),
            param_dtype=as_jnp_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        qkv_axes = (_VEMBED, "vision_heads", "vision_head_dim")
        self.q_proj = Linear(d, (n, h), kernel_axes=qkv_axes, **kw)
        self.k_proj = Linear(d, (n, h), kernel_axes=qkv_axes, **kw)
        self.v_proj = Linear(d, (n, h), kernel_axes=qkv_axes, **kw)
        self.out_proj = Linear((n, h), d, kernel_axes=("vision_heads", "vision_head_dim", _VEMBED), **kw)

    def __call__(self, x_bld):
        q, k, v = self.q_proj(x_bld), self.k_proj(x_bld), self.v_proj(x_bld)
        scale = q.shape[-1] ** -0.5
        s = jnp.einsum("blnh,bmnh->bnlm", q, k, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bnlm,bmnh->blnh", probs, v))


class VisionMLP(nnx.Module):
    """fc2(act(fc1(x))); fc1 [D, F] ("vision_embed","vision_mlp"), fc2 [F, D]."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(
            use_bias=True,
            dtype=as_jnp_dtype(cfg.dtype),
            param_dtype=as_jnp_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, kernel_axes=(_VEMBED, "vision_mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, kernel_axes=("vision_mlp", _VEMBED), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        pdt = as_jnp_dtype(cfg.param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt)
        self.self_attn = VisionAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipPoolingHead(nnx.Module):
    """SigLIP attention-pooling head parameters (probe, fused in-proj [D, 3D], out-proj,
    layernorm, mlp). Kept for exact import/export; LLaVA features do not use it."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        dt, pdt = as_jnp_dtype(cfg.dtype), as_jnp_dtype(cfg.param_dtype)
        d = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.probe = param(rngs, (1, 1, d), (None, None, _VEMBED), pdt)
        self.in_proj = Linear(d, 3 * d, kernel_axes=(_VEMBED, None), **kw)
        self.out_proj = Linear(d, d, kernel_axes=(_VEMBED, None), **kw)
        self.layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pdt)
        self.mlp = VisionMLP(cfg, rngs=rngs)


class VisionTower(nnx.Module):
    """CLIP / SigLIP ViT; its blocks are one stacked module run under a scan (models/stack.py).
    `hidden_states_at(pixels, indices)` gives HF's hidden states at those indices."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = as_jnp_dtype(cfg.param_dtype)
        self.embeddings = VisionEmbeddings(cfg, rngs=rngs)
        if cfg.family == "clip":
            self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt)
        else:
            self.pre_layrnorm = None
        self.layers = stack_modules(lambda: VisionBlock(cfg, rngs=rngs), cfg.num_layers)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt)
        self.head = SiglipPoolingHead(cfg, rngs=rngs) if cfg.family == "siglip" and cfg.use_head else None

    def hidden_states_at(self, pixel_values_bchw, indices) -> list:
        """[B, L, D] hidden states at `indices` (0: encoder input; i: after layer i), in the
        order given; layers past the largest index are not run."""
        n = self.config.num_layers
        if any(not 0 <= i <= n for i in indices):
            raise ValueError(f"hidden state indices {list(indices)} outside 0..{n}")
        x = self.embeddings(pixel_values_bchw)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states, done = {0: x}, 0
        for stop in sorted(set(indices) - {0}):  # one scan per segment between wanted states
            x, _ = scan_layers(self.layers, _run_block, x, start=done, stop=stop)
            states[stop], done = x, stop
        return [states[i] for i in indices]

    def __call__(self, pixel_values_bchw):
        """Last hidden state [B, L, D] as HF's `last_hidden_state` (SigLIP: after post-LN)."""
        (x,) = self.hidden_states_at(pixel_values_bchw, [self.config.num_layers])
        return self.post_layernorm(x) if self.config.family == "siglip" else x


def _run_block(block: VisionBlock, x, _):
    return block(x), None
