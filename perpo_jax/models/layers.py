"""Building blocks shared by the decoder and the vision towers (Flax NNX).

Every parameter is an `nnx.Param` carrying logical axis names (keys of
`perpo_jax.mesh.LOGICAL_RULES`) with `eager_sharding=False`: the model never hard-codes mesh
axes; `perpo_jax.mesh.state_shardings` turns the names into shardings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from perpo_jax.models.config import RopeScaling

INIT_STD = 0.02  # std of random normal init (tests/demos; real runs load weights)


class ShapeOnlyKeys:
    """Stands in for `nnx.Rngs` when a model is built under `nnx.eval_shape` (shapes only: the
    plan's abstract model, the skeleton a checkpoint is loaded into): each stream gives one
    fixed key, so a draw updates no counter. Why: under `eval_shape` every nnx.Rngs draw makes
    flax compare the new counter's `.sharding`, which on a tracer builds an error text by
    walking the whole trace so far -- quadratic in the model's size (28 of the 34 s of the 7B
    abstract model with LoRA, profiled), linear here."""

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)

    def params(self) -> jax.Array:
        return self._key

    def dropout(self) -> jax.Array:
        return self._key


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names. init: "normal" (std 0.02), "zeros" or "ones"."""
    shape = tuple(int(s) for s in shape)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """y = x · kernel (+ bias) over multi-dimensional in/out feature shapes.

    kernel: [*in_shape, *out_shape] (e.g. a query projection [D, N, H]); bias: [*out_shape].
    x: [..., *in_shape] -> y: [..., *out_shape], computed in `dtype`.

    `lora` is the adapter slot (None by default). `perpo_jax.models.lora` sets it to a module
    called as `self.lora(x)` with the SAME input x ([..., *in_shape]) that must return
    [..., *out_shape]; its output is added to y. Nothing else here knows about training.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        kernel_axes: Sequence[str | None],
        use_bias: bool = False,
        bias_axes: Sequence[str | None] | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        if len(kernel_axes) != len(self.in_shape) + len(self.out_shape):
            raise ValueError(f"kernel_axes {kernel_axes} do not match {self.in_shape}+{self.out_shape}")
        self.dtype = dtype
        self.kernel = param(rngs, self.in_shape + self.out_shape, kernel_axes, param_dtype)
        if use_bias:
            axes = tuple(kernel_axes[len(self.in_shape):]) if bias_axes is None else tuple(bias_axes)
            self.bias = param(rngs, self.out_shape, axes, param_dtype, init="zeros")
        else:
            self.bias = None
        self.lora = None

    def __call__(self, x):
        n_in = len(self.in_shape)
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel,
            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y


class Embedding(nnx.Module):
    """Token embedding table [V, D] ("vocab", "embed"); `attend` gives tied-output logits."""

    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids):
        """ids [...] int -> [..., D] in `dtype`."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x):
        """x [..., D] -> logits [..., V] float32 (tied lm_head)."""
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), table).astype(jnp.float32)


class RMSNorm(nnx.Module):
    """HF Llama/Qwen2 RMSNorm: normalise in float32, cast back to the input dtype, scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axes=("norm",)):
        self.eps = eps
        self.scale = param(None, (dim,), axes, param_dtype, init="ones")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm semantics (biased variance), statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axes=("norm",)):
        self.eps = eps
        self.scale = param(None, (dim,), axes, param_dtype, init="ones")
        self.bias = param(None, (dim,), axes, param_dtype, init="zeros")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """HF `hidden_act` name -> function; a clear error for names we do not port."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jnp.ndarray:
    """Inverse frequencies [H/2] float32 as HF computes them for rope types default/linear/llama3."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling kind {scaling.kind!r} (supported: linear, llama3)")


def rope_cos_sin(positions, inv_freq, dtype):
    """positions [...] int -> (cos, sin) [..., H] in `dtype` (frequencies repeated twice, HF layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """x [..., T, N, H]; cos/sin [..., T, H] (broadcast over heads N). HF rotate_half form."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]
