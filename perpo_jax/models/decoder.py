"""Decoder-only LM (Llama / Qwen2 family) with the prefill/extend KV interface.

Shape letters: B batch, G groups per row (candidates or samples), T tokens of this call,
P prefix (prompt) slots, S cache slots, D hidden, N query heads, K kv heads, R = N // K query
heads per kv head, H head dim, F mlp width, V vocab, L layers (the blocks are one stacked module
run under `jax.lax.scan`: models/stack.py).

There is ONE attention core (`grouped_attention`): queries [B, G, T, N, H] attend to a shared
prefix segment [B, P, K, H] (broadcast over G by the einsum, never copied) and to an own segment
[B, G, S, K, H] (this call's tokens, or a per-group cache). A plain forward/prefill is the case
G = 1 without prefix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from perpo_jax.models.attention_kernels import CausalOwnMask, choose, fused_attention
from perpo_jax.models.config import TextConfig, as_jnp_dtype
from perpo_jax.models.layers import (
    Embedding,
    Linear,
    RMSNorm,
    activation,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
)
from perpo_jax.models.stack import scan_layers, stack_modules

# Masked-out scores: large finite negative (not -inf) so fully masked rows stay finite.
MASK_VALUE = -1e30


@struct.dataclass
class PrefixKV:
    """K/V of a prefilled prompt, shared by every group of a row.

    k, v: [L, B, P, K, H] stacked over layers (keys RoPE-rotated); mask: [B, P] bool.
    """

    k: tuple
    v: tuple
    mask: jax.Array


@struct.dataclass
class GroupCache:
    """Per-group decode cache. k, v: [L, B, G, S, K, H] stacked over layers; mask [B, G, S] bool."""

    k: tuple
    v: tuple
    mask: jax.Array


# Causal self-attention longer than this runs in query blocks of this many tokens.
CAUSAL_BLOCK = 128


def grouped_attention(q_bgtnh, k_bgskh, v_bgskh, own_mask_bgts, prefix=None, causal=False):
    """Softmax attention over [prefix segment ; own segment], float32 softmax.

    q_bgtnh: [B, G, T, N, H]; k/v_bgskh: [B, G, S, K, H]; own_mask_bgts: [B|1, G|1, T, S] bool,
    or a `CausalOwnMask` (own keys = this call's tokens, S = T: validity [B, G, T] + causal),
    the structural form a fused kernel takes: its `implementation` (TextConfig.attention) picks
    splash / cuDNN / this XLA core (models/attention_kernels.py; padding rows may then differ).
    prefix: None or (k_bpkh [B, P, K, H], v_bpkh, mask_bp [B, P] bool) shared by all G groups.
    causal: the caller promises own_mask is zero above the diagonal (query i sees no key > i).
    Then, without a prefix and for T = S > 2 · CAUSAL_BLOCK, queries run in blocks that score
    only the keys up to their block's end (the keys dropped are masked anyway: same numbers,
    ~40 % fewer scores, smaller float32 score tensors).
    Returns [B, G, T, N, H] in q's dtype.
    """
    if isinstance(own_mask_bgts, CausalOwnMask):
        kernel = choose(own_mask_bgts.implementation, has_prefix=prefix is not None,
                        dtype=q_bgtnh.dtype, head_dim=q_bgtnh.shape[-1])
        if kernel != "xla":
            return fused_attention(kernel, q_bgtnh, k_bgskh, v_bgskh, own_mask_bgts.valid_bgt,
                                   prefix)
        own_mask_bgts, causal = own_mask_bgts.dense(), True
    b, g, t, n, h = q_bgtnh.shape
    s, kv_heads = k_bgskh.shape[2], k_bgskh.shape[-2]
    if causal and prefix is None and t == s and t > 2 * CAUSAL_BLOCK:
        blocks = tuple((lo, min(lo + CAUSAL_BLOCK, t), min(lo + CAUSAL_BLOCK, t))
                       for lo in range(0, t, CAUSAL_BLOCK))
    else:
        blocks = ((0, t, s),)
    # Queries go to [B, G, K, R, T, H] so every score tensor is [B, G, K, R, T, S|P]: the layout
    # a batched matmul writes and reads without transposes (keys stay as stored: a decode
    # step never copies its cache).
    q_bgkrth = q_bgtnh.reshape(b, g, t, kv_heads, n // kv_heads, h).transpose(0, 1, 3, 4, 2, 5)
    out_bgkrth = _attend(blocks, q_bgkrth, k_bgskh, v_bgskh, own_mask_bgts, prefix)
    return out_bgkrth.transpose(0, 1, 4, 2, 3, 5).reshape(b, g, t, n, h).astype(q_bgtnh.dtype)


# Score / value contractions of `_attend`, queries [B, G, K, R, T, H]: own keys [B, G, S, K, H],
# prefix keys [B, P, K, H] (one per row, broadcast over G).
_OWN_SCORES, _PRE_SCORES = "bgkrth,bgskh->bgkrts", "bgkrth,bpkh->bgkrtp"
_OWN_VALUES, _PRE_VALUES = "bgkrts,bgskh->bgkrth", "bgkrtp,bpkh->bgkrth"
_OWN_KEY_GRAD, _PRE_KEY_GRAD = "bgkrts,bgkrth->bgskh", "bgkrtp,bgkrth->bpkh"


def _block_inputs(blocks, q, k_own, v_own, own_mask):
    """Per query block (lo, hi, seen): its queries, the own keys/values it can see (the first
    `seen`) and its mask rows; one block covering everything passes the inputs as they are."""
    if len(blocks) == 1:
        return [(q, k_own, v_own, own_mask)]
    return [(q[..., lo:hi, :], k_own[:, :, :seen], v_own[:, :, :seen],
             own_mask[:, :, lo:hi, :seen]) for lo, hi, seen in blocks]


def _attention_probs(q, k_own, own_mask, prefix):
    """Float32 softmax probabilities over [prefix ; own] keys: (p_pre [.., P] | None, p_own)."""
    scale = q.shape[-1] ** -0.5
    f32 = jnp.float32
    s_own = jnp.einsum(_OWN_SCORES, q, k_own, preferred_element_type=f32) * scale
    s_own = jnp.where(own_mask[:, :, None, None], s_own, MASK_VALUE)
    if prefix is None:
        return None, jax.nn.softmax(s_own, axis=-1)
    k_pre, _, mask_pre = prefix
    s_pre = jnp.einsum(_PRE_SCORES, q, k_pre, preferred_element_type=f32) * scale
    s_pre = jnp.where(mask_pre[:, None, None, None, None, :], s_pre, MASK_VALUE)
    # one softmax over both segments without concatenating them
    top = jnp.maximum(s_pre.max(-1, keepdims=True), s_own.max(-1, keepdims=True))
    e_pre, e_own = jnp.exp(s_pre - top), jnp.exp(s_own - top)
    total = e_pre.sum(-1, keepdims=True) + e_own.sum(-1, keepdims=True)
    return e_pre / total, e_own / total


def _attend_fwd(blocks, q, k_own, v_own, own_mask, prefix):
    outs, probs = [], []
    for q_blk, k_blk, v_blk, mask_blk in _block_inputs(blocks, q, k_own, v_own, own_mask):
        p_pre, p_own = _attention_probs(q_blk, k_blk, mask_blk, prefix)
        out = jnp.einsum(_OWN_VALUES, p_own.astype(v_blk.dtype), v_blk)
        if prefix is not None:
            out = out + jnp.einsum(_PRE_VALUES, p_pre.astype(prefix[1].dtype), prefix[1])
        outs.append(out)
        probs.append((p_pre, p_own))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-2)
    # residuals: the inputs as given (never per-block slices of the keys) and the probabilities
    return out, (q, k_own, v_own, own_mask, prefix, probs, out)


def _attend_bwd(blocks, res, d_out):
    """Softmax attention's VJP from the saved float32 probabilities P, per query block:
    dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = dS K · scale, dK = dSᵀ Q · scale;
    a block's key/value gradients add into the keys it saw."""
    q, k_own, v_own, own_mask, prefix, probs, out = res
    scale = q.shape[-1] ** -0.5
    f32 = jnp.float32
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    dk_own, dv_own = jnp.zeros(k_own.shape, f32), jnp.zeros(v_own.shape, f32)
    dk_pre = dv_pre = None
    dq_blocks = []
    inputs = _block_inputs(blocks, q, k_own, v_own, own_mask)
    for (lo, hi, seen), (q_blk, k_blk, v_blk, _), (p_pre, p_own) in zip(blocks, inputs, probs):
        do_blk, row_blk = d_out[..., lo:hi, :], row[..., lo:hi, :]
        dp_own = jnp.einsum(_OWN_SCORES, do_blk, v_blk, preferred_element_type=f32)
        ds_own = ((p_own * (dp_own - row_blk)) * scale).astype(q.dtype)
        dq_blk = jnp.einsum(_OWN_VALUES, ds_own, k_blk, preferred_element_type=f32)
        dv_own = dv_own.at[:, :, :seen].add(
            jnp.einsum(_OWN_KEY_GRAD, p_own.astype(do_blk.dtype), do_blk, preferred_element_type=f32))
        dk_own = dk_own.at[:, :, :seen].add(
            jnp.einsum(_OWN_KEY_GRAD, ds_own, q_blk, preferred_element_type=f32))
        if prefix is not None:  # one block only (no causal blocking with a prefix)
            k_pre, v_pre, _ = prefix
            dv_pre = jnp.einsum(_PRE_KEY_GRAD, p_pre.astype(do_blk.dtype), do_blk).astype(v_pre.dtype)
            dp_pre = jnp.einsum(_PRE_SCORES, do_blk, v_pre, preferred_element_type=f32)
            ds_pre = ((p_pre * (dp_pre - row_blk)) * scale).astype(q.dtype)
            dq_blk = dq_blk + jnp.einsum(_PRE_VALUES, ds_pre, k_pre, preferred_element_type=f32)
            dk_pre = jnp.einsum(_PRE_KEY_GRAD, ds_pre, q_blk).astype(k_pre.dtype)
        dq_blocks.append(dq_blk)
    dq = dq_blocks[0] if len(dq_blocks) == 1 else jnp.concatenate(dq_blocks, axis=-2)
    d_prefix = None if prefix is None else (dk_pre, dv_pre, None)
    return (dq.astype(q.dtype), dk_own.astype(k_own.dtype), dv_own.astype(v_own.dtype), None,
            d_prefix)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(blocks, q_bgkrth, k_bgskh, v_bgskh, own_mask_bgts, prefix):
    """Attention core, [B, G, K, R, T, H] in and out; `blocks`: static query blocks
    (lo, hi, seen), each scoring the first `seen` own keys (one block (0, T, S) scores all of
    them; a causal block sees the keys before its end). A custom VJP
    because autodiff of the masked float32 softmax kept the scores AND the probabilities and
    re-laid them out between its passes (see bench/list_step.py's before/after in the README)."""
    return _attend_fwd(blocks, q_bgkrth, k_bgskh, v_bgskh, own_mask_bgts, prefix)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; q [D, N, H], k/v [D, K, H], o [N, H, D]."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        dt, pdt = as_jnp_dtype(cfg.dtype), as_jnp_dtype(cfg.param_dtype)
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        self.q_proj = Linear(d, (n, h), kernel_axes=("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(d, (k, h), kernel_axes=("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(d, (k, h), kernel_axes=("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear((n, h), d, kernel_axes=("heads", "head_dim", "embed"), use_bias=cfg.o_bias, **kw)

    def __call__(self, x_bgtd, cos, sin, own_mask, prefix, cache_kv, cache_index, causal=False):
        """x [B, G, T, D]; cos/sin [B, G, T, H]; prefix (k, v, mask) or None;
        cache_kv (k, v) [B, G, S, K, H] of this layer or None; causal: own_mask is causal (see
        `grouped_attention`). Returns (out [B, G, T, D], (k, v) [B, G, T, K, H] of this call's
        tokens); with a cache they are also written at [cache_index, cache_index + T) of the
        layer's cache before attending (the caller writes them into its stacked cache)."""
        q = apply_rope(self.q_proj(x_bgtd), cos, sin)
        k = apply_rope(self.k_proj(x_bgtd), cos, sin)
        v = self.v_proj(x_bgtd)
        if cache_kv is None:
            keys, values = k, v
        else:
            ck, cv = cache_kv
            start = (0, 0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
            values = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
        out = grouped_attention(q, keys, values, own_mask, prefix, causal=causal)
        return self.o_proj(out), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); gate/up [D, F] ("embed","mlp"), down [F, D]."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        kw = dict(
            use_bias=cfg.mlp_bias,
            dtype=as_jnp_dtype(cfg.dtype),
            param_dtype=as_jnp_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, kernel_axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, kernel_axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, kernel_axes=("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        pdt = as_jnp_dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, own_mask, prefix, cache_kv, cache_index, causal=False):
        attn_out, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, own_mask, prefix, cache_kv, cache_index, causal
        )
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class DecoderLM(nnx.Module):
    """Llama / Qwen2 causal LM. See docs/internals.md for the interface contract."""

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt, pdt = as_jnp_dtype(config.dtype), as_jnp_dtype(config.param_dtype)
        self.embed_tokens = Embedding(
            config.vocab_size, config.hidden_size, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        # ONE block with [L, ...] Variables, run under jax.lax.scan (models/stack.py)
        self.layers = stack_modules(lambda: DecoderBlock(config, rngs=rngs), config.num_layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pdt)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                kernel_axes=("embed", "vocab"),
                dtype=dt,
                param_dtype=pdt,
                rngs=rngs,
            )

    # ------------------------------------------------------------------ public interface

    def embed(self, input_ids_bt, pixel_values=None):
        """input_ids [B, T] int -> embeddings [B, T, D] (compute dtype)."""
        if pixel_values is not None:
            raise ValueError("DecoderLM is text-only: pixel_values must be None")
        return self.embed_tokens(input_ids_bt)

    def logits(self, hidden):
        """Final-normed hidden [..., D] (as prefill/extend return) -> logits [..., V] float32."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, positions=None):
        """Plain forward: input_ids [B, T] -> logits [B, T, V] float32 (positions default arange(T))."""
        hidden, _ = self.prefill(self.embed(input_ids, pixel_values), attention_mask, positions)
        return self.logits(hidden)

    def prefill(self, embeds_btd, attention_mask_bt=None, positions_bt=None):
        """Causal, padding-aware pass over a prompt.

        embeds [B, T, D]; attention_mask [B, T] 0/1 (None: all valid); positions [B, T]
        (None: arange(T)). Returns (hidden [B, T, D] after the final norm, PrefixKV with
        k/v [B, T, K, H] per layer and mask [B, T]).
        """
        b, t, _ = embeds_btd.shape
        mask_bt = (
            jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        )
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        own_mask = CausalOwnMask(mask_bt[:, None], self.config.attention)
        x, (k, v) = self._blocks(embeds_btd[:, None], positions_bt[:, None], own_mask, None, None,
                                 None, causal=True, collect_kv=True)
        return x[:, 0], PrefixKV(k=k[:, :, 0], v=v[:, :, 0], mask=mask_bt)

    def extend(self, embeds_bgtd, positions_bgt, mask_bgt, prefix=None, cache=None, cache_index=None):
        """Runs G groups of T tokens per row after an optional shared prefix.

        embeds [B, G, T, D]; positions [B, G, T] (explicit, e.g. continuing from the prompt
        length); mask [B, G, T] marks real tokens. Each token attends to every valid prefix
        slot and to its own group's causal past: this call's tokens (cache=None) or the
        filled cache slots <= cache_index + t after this call's K/V are written at
        [cache_index, cache_index + T) (the caller keeps cache_index + T <= S).
        Returns (hidden [B, G, T, D] after the final norm, updated GroupCache or None).
        """
        t = embeds_bgtd.shape[2]
        mask_bgt = mask_bgt.astype(bool)
        if cache is None:
            own_mask = CausalOwnMask(mask_bgt, self.config.attention)
            new_mask = None
        else:
            if cache_index is None:
                raise ValueError("extend(cache=...) needs cache_index")
            new_mask = jax.lax.dynamic_update_slice(cache.mask, mask_bgt, (0, 0, cache_index))
            s = cache.mask.shape[-1]
            slot_ok_ts = jnp.arange(s)[None, :] <= cache_index + jnp.arange(t)[:, None]
            own_mask = new_mask[:, :, None, :] & slot_ok_ts[None, None]
        x, kv = self._blocks(embeds_bgtd, positions_bgt, own_mask, prefix, cache, cache_index)
        if cache is None:
            return x, None
        # this call's K/V of every layer [L, B, G, T, K, H] into the stacked cache, in place
        start = (0, 0, 0, cache_index, 0, 0)
        k = jax.lax.dynamic_update_slice(cache.k, kv[0].astype(cache.k.dtype), start)
        v = jax.lax.dynamic_update_slice(cache.v, kv[1].astype(cache.v.dtype), start)
        return x, GroupCache(k=k, v=v, mask=new_mask)

    def init_cache(self, batch: int, groups: int, max_len: int) -> GroupCache:
        """Empty cache: k/v zeros [L, B, G, S, K, H] (compute dtype), mask all False."""
        cfg = self.config
        shape = (cfg.num_layers, batch, groups, max_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, as_jnp_dtype(cfg.dtype))
        return GroupCache(k=zeros, v=zeros, mask=jnp.zeros((batch, groups, max_len), bool))

    # ------------------------------------------------------------------ internals

    def _blocks(self, x_bgtd, positions_bgt, own_mask, prefix, cache, cache_index, causal=False,
                collect_kv=False):
        """Runs the stacked blocks under one scan; returns (final-normed x, this call's K/V of
        every layer, each [L, B, G, T, K, H], or None). The prefix's and the cache's per-layer
        K/V are the scan's inputs. causal: own_mask is causal (prefill), so attention may skip
        key blocks it masks. collect_kv: return the K/V without a cache too (prefill)."""
        cfg = self.config
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_cos_sin(positions_bgt, inv_freq, as_jnp_dtype(cfg.dtype))
        x = x_bgtd.astype(as_jnp_dtype(cfg.dtype))
        layer_xs = {}
        if prefix is not None:
            layer_xs["prefix"] = (prefix.k, prefix.v)
        if cache is not None:
            layer_xs["cache"] = (cache.k, cache.v)
        keep_kv = collect_kv or cache is not None

        def body(block, x, xs):
            layer_prefix = None if prefix is None else (*xs["prefix"], prefix.mask)
            x, kv = block(x, cos, sin, own_mask, layer_prefix, xs.get("cache"), cache_index, causal)
            return x, (kv if keep_kv else None)

        x, kv = scan_layers(self.layers, body, x, layer_xs, remat=cfg.remat)
        return self.norm(x), kv
