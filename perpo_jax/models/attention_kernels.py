"""Fused attention for `decoder.grouped_attention`, chosen by the platform it compiles for.

Shape letters as in decoder.py: B batch, G groups, T this call's tokens, P prefix slots,
N query heads, K kv heads, R = N // K, H head dim; L a padded sequence length.

`CausalOwnMask` is the own segment's mask in structural form (token validity [B, G, T] and
"causal over this call's tokens"), which is what a kernel takes; `dense()` rebuilds the
[B, G, T, T] boolean mask of the XLA path (decoder's custom-VJP `_attend`).

Implementations (`TextConfig.attention`, user key `model.attention`):
- "xla": decoder's custom-VJP core (every platform; the only one for decode steps).
- "splash": Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
  one MQA kernel per kv head (GQA), batch and kv heads split by `shard_map` over the
  mesh the program is traced under. On a non-TPU target it runs in Pallas' interpret mode
  (plain XLA ops: slow, for tests).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` where the mask is
  expressible by sequence lengths (no shared prefix; right-padded tokens; bf16/fp16;
  head_dim ≤ 128 and a multiple of 8), else "xla".
- "auto": the target devices' platform decides: TPU → splash (when the program's mesh is
  known or it runs on one device), GPU → cudnn where it fits, else xla.

Padding rows (tokens whose validity is False) get finite values that differ between
implementations (the XLA path lets them see the valid keys, the kernels let them see the
padding keys): as decoder.py documents, those rows are garbage no real token ever reads.
Rows of real tokens agree to float32 round-off, values and gradients
(tests/test_attention_kernels.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from perpo_jax.mesh import LOGICAL_RULES, logical_to_spec
from perpo_jax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS


@struct.dataclass
class CausalOwnMask:
    """The own segment's mask when the own keys are this call's tokens: query t of a group sees
    the group's valid tokens s <= t. valid_bgt: [B, G, T] bool; implementation: one of
    IMPLEMENTATIONS (static)."""

    valid_bgt: jax.Array
    implementation: str = struct.field(pytree_node=False, default="xla")

    def dense(self) -> jax.Array:
        """[B, G, T, T] bool: valid key and s <= t (the XLA path's own mask)."""
        t = self.valid_bgt.shape[-1]
        return self.valid_bgt[:, :, None, :] & jnp.tril(jnp.ones((t, t), bool))[None, None]


# ----------------------------------------------------------------------------- choosing


def target_platform() -> tuple[str, bool]:
    """(platform of the devices the program is traced for, whether their mesh is known).

    The abstract mesh of `jax.sharding.use_abstract_mesh` / `jax.set_mesh` (train/step.py sets
    it) names the target devices, which differ from `jax.default_backend()` when a CPU host
    compiles for a TPU topology; without one, the default backend is the target."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is None:
        return jax.default_backend(), False
    return device.platform, True


def cudnn_fits(*, has_prefix: bool, dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention can express this call: causal + right padding by sequence
    lengths (a shared prefix would need a dense bias), bf16/fp16, head_dim % 8 == 0, <= 128."""
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return not has_prefix and low_precision and head_dim % 8 == 0 and head_dim <= 128


def choose(requested: str, *, has_prefix: bool, dtype, head_dim: int) -> str:
    """The implementation ("xla" | "splash" | "cudnn") that runs a `CausalOwnMask` call."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention: {requested!r} is not one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if requested == "xla":
        return "xla"
    platform, mesh_known = target_platform()
    fits_cudnn = cudnn_fits(has_prefix=has_prefix, dtype=dtype, head_dim=head_dim)
    if requested == "splash":
        if platform == "gpu":
            raise ValueError("model.attention=splash is a TPU kernel; on GPU use cudnn or auto")
        return "splash"
    if requested == "cudnn":
        if platform != "gpu":
            raise ValueError(f"model.attention=cudnn needs a GPU target; this program is "
                             f"compiled for {platform} (use auto or xla)")
        return "cudnn" if fits_cudnn else "xla"
    # auto. A Mosaic kernel in a multi-device program must sit inside shard_map, which needs
    # the mesh; without it the XLA path is the safe choice.
    if platform == "tpu" and (mesh_known or jax.device_count() == 1):
        return "splash"
    if platform == "gpu" and fits_cudnn:
        return "cudnn"
    return "xla"


def fused_attention(implementation, q_bgtnh, k_bgtkh, v_bgtkh, valid_bgt, prefix=None):
    """Attention of queries [B, G, T, N, H] over [prefix ; own causal segment] with a kernel.

    k/v_bgtkh: [B, G, T, K, H] (this call's tokens); valid_bgt: [B, G, T] bool; prefix: None or
    (k_bpkh [B, P, K, H], v_bpkh, mask_bp [B, P] bool) shared by all G groups.
    Returns [B, G, T, N, H] in q's dtype."""
    if implementation == "splash":
        platform, _ = target_platform()
        return splash_attention(q_bgtnh, k_bgtkh, v_bgtkh, valid_bgt, prefix,
                                interpret=platform != "tpu")
    if implementation == "cudnn":
        if prefix is not None:
            raise ValueError("cudnn attention cannot express a shared prefix (use xla)")
        return cudnn_attention(q_bgtnh, k_bgtkh, v_bgtkh, valid_bgt)
    raise ValueError(f"no fused attention called {implementation!r}")


# ----------------------------------------------------------------------------- splash (TPU)
#
# Layout: per row b, the G groups' queries are laid end to end, [G·T] padded to Lq (a multiple
# of 128, the kernel's smallest block), and attend to keys [own tokens (Lq) ; prefix (Lp)],
# Lp = P rounded up to 128. One static block-sparse mask (splash NumpyMask) says: a query of
# group g sees every prefix column and its own group's columns s <= t; padding comes in as
# segment ids (valid token 1, padding 0; a query sees keys of its own id). Every row therefore
# sees at least itself (its diagonal own key has its own id), so no row is empty and the
# kernel's softmax never divides by zero, even for all-padding lists.
#   Memory: one copy of [own ; prefix] K/V per layer (the prefix once per row, never per group);
#   the backward keeps q, k, v, out and the log-sum-exp ([.., L] not [.., T, S] probabilities
#   as the XLA path does). FLOPs: the blocks the mask touches: every prefix block for each
#   group's queries (what the XLA path computes too) and, of the own part, only the blocks on
#   each group's causal diagonal (the XLA path scores all G·T·T).
#   The alternative, two kernel calls (prefix, own) merged by log-sum-exp, saves the one
#   K/V copy but needs the LSE's gradient, which splash does not expose (save_residuals is
#   forward-only); one call keeps splash's own tested backward.

_LANE = 128  # splash blocks are multiples of 128 on both sequence axes


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(length: int, cap: int) -> int:
    """The largest of 512 / 256 / 128 that is <= cap and divides length (a multiple of 128)."""
    return max(b for b in (512, 256, _LANE) if b <= max(cap, _LANE) and length % b == 0)


def grouped_causal_mask(groups: int, t: int, lq: int, lp: int) -> np.ndarray:
    """[Lq, Lq + Lp] bool: query i of group i // T (the rows past G·T form one more group) sees
    its group's columns j <= i and, if it is a real group's, every prefix column."""
    i = np.arange(lq)
    group = np.minimum(i // t, groups)
    own = (group[:, None] == group[None, :]) & (i[None, :] <= i[:, None])
    pre = np.broadcast_to((i < groups * t)[:, None], (lq, lp))
    return np.concatenate([own, pre], axis=1)


@functools.lru_cache(maxsize=64)
def _splash_kernel(groups: int, t: int, lq: int, lp: int, heads: int, interpret: bool):
    """One MQA splash kernel (`heads` query heads over one kv head) for this static layout;
    cached: every layer of a model reuses it and the mask processing runs once per shape."""
    if groups == 1 and lp == 0:  # a plain causal prefill: splash computes the mask in-kernel
        mask = splash.CausalMask((lq, lq))
    else:
        mask = splash.NumpyMask(grouped_causal_mask(groups, t, lq, lp))
    # block caps: up to 512 rows; with many short groups, blocks about a group long so the
    # own part's blocks off each group's diagonal are skipped, not computed and masked
    cap = 512 if groups == 1 else 1 << max(t - 1, 1).bit_length()
    bq, bkv = _block(lq, cap), _block(lq + lp, cap)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                              block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                              block_q_dq=bq, block_kv_dq=bkv)
    # the mask tables are built as constants, never as tracers of the trace that first asks
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa(splash.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_bgtnh, k_bgtkh, v_bgtkh, valid_bgt, prefix=None, *, interpret=False):
    """Splash attention of `fused_attention`'s arguments (same shapes, same result on the rows
    of valid tokens). interpret: run the kernel as XLA ops (CPU tests)."""
    b, g, t, n, h = q_bgtnh.shape
    kv_heads = k_bgtkh.shape[-2]
    own, r = g * t, n // kv_heads
    lq = _round_up(own, _LANE)
    lp = _round_up(0 if prefix is None else prefix[0].shape[1], _LANE)
    # queries [B, K, R, Lq, H], scaled here (splash takes q·k as the score)
    q_bgtkrh = (q_bgtnh * jnp.asarray(h ** -0.5, q_bgtnh.dtype)).reshape(b, g, t, kv_heads, r, h)
    q_bkrlh = _pad_to(q_bgtkrh.transpose(0, 3, 4, 1, 2, 5).reshape(b, kv_heads, r, own, h), lq, 3)

    def own_keys(x_bgtkh):  # -> [B, K, Lq, H]
        x_bklh = x_bgtkh.astype(k_bgtkh.dtype).transpose(0, 3, 1, 2, 4).reshape(b, kv_heads, own, h)
        return _pad_to(x_bklh, lq, 2)

    def prefix_keys(x_bpkh):  # -> [B, K, Lp, H]
        return _pad_to(x_bpkh.astype(k_bgtkh.dtype).transpose(0, 2, 1, 3), lp, 2)

    k_bklh, v_bklh = own_keys(k_bgtkh), own_keys(v_bgtkh)
    seg_q_bl = _pad_to(valid_bgt.reshape(b, own).astype(jnp.int32), lq, 1)
    seg_kv_bl = seg_q_bl
    if prefix is not None:
        k_pre, v_pre, mask_pre = prefix
        k_bklh = jnp.concatenate([k_bklh, prefix_keys(k_pre)], axis=2)
        v_bklh = jnp.concatenate([v_bklh, prefix_keys(v_pre)], axis=2)
        seg_kv_bl = jnp.concatenate([seg_q_bl, _pad_to(mask_pre.astype(jnp.int32), lp, 1)], 1)
    kernel = _splash_kernel(g, t, lq, lp, r, interpret)

    def per_shard(q, k, v, seg_q, seg_kv):
        def per_row(q_krlh, k_klh, v_klh, seg_q_l, seg_kv_l):
            ids = splash.SegmentIds(q=seg_q_l, kv=seg_kv_l)
            per_kv_head = lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids)  # noqa: E731
            return jax.vmap(per_kv_head)(q_krlh, k_klh, v_klh)
        return jax.vmap(per_row)(q, k, v, seg_q, seg_kv)

    heads_axes = ("batch", "kv_heads", None, None)
    out_bkrlh = _shard_mapped(
        per_shard, (q_bkrlh, k_bklh, v_bklh, seg_q_bl, seg_kv_bl),
        (heads_axes + (None,), heads_axes, heads_axes, ("batch", None), ("batch", None)))
    out = out_bkrlh[:, :, :, :own].reshape(b, kv_heads, r, g, t, h)
    return out.transpose(0, 3, 4, 1, 2, 5).reshape(b, g, t, n, h).astype(q_bgtnh.dtype)


def _pad_to(x, length: int, axis: int):
    """x padded with zeros along `axis` to `length`."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def _shard_mapped(fn, args, logical_axes):
    """fn(*args) inside `shard_map` over the traced-for mesh (a Mosaic kernel cannot be
    partitioned by XLA): each array split by its logical axes through the project's one rules
    table (batch over data·fsdp, kv heads over tensor, replicated where they do not divide);
    the output is laid out like the first argument. Without a mesh, fn(*args) as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    rules = {name: _present(target, mesh.axis_names) for name, target in LOGICAL_RULES.items()}
    specs = tuple(logical_to_spec(axes, x.shape, mesh, rules)
                  for axes, x in zip(logical_axes, args))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                         check_vma=False)(*args)


def _present(target, axis_names):
    """A rules-table target restricted to the mesh axes that exist (None if none do)."""
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept = tuple(a for a in axes if a in axis_names)
    return kept or None


# ----------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_attention(q_bgtnh, k_bgtkh, v_bgtkh, valid_bgt, *, implementation="cudnn"):
    """Causal self-attention of each group's tokens by `jax.nn.dot_product_attention`, padding
    by sequence lengths: groups fold into the batch, lengths = valid tokens per group, which is
    the mask only for RIGHT-padded validity (every caller in this project pads on the right:
    prompts, candidates, naive sequences). Rows past a length come back as zeros.
    implementation: passed through ("xla" computes the same numbers on any platform)."""
    b, g, t, n, h = q_bgtnh.shape
    kv_heads = k_bgtkh.shape[-2]
    # an all-padding group gets length 1 (it sees its first, padding, token): a zero length is
    # a case cuDNN's padding masks were not checked for here
    lengths = jnp.maximum(valid_bgt.reshape(b * g, t).astype(jnp.int32).sum(-1), 1)
    out = jax.nn.dot_product_attention(
        q_bgtnh.reshape(b * g, t, n, h), k_bgtkh.reshape(b * g, t, kv_heads, h),
        v_bgtkh.reshape(b * g, t, kv_heads, h).astype(k_bgtkh.dtype), is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
    return out.reshape(b, g, t, n, h).astype(q_bgtnh.dtype)

