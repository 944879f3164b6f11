"""LoRA adapters on the model's `Linear` layers, the base model doubling as the reference.

`apply_lora(model, cfg, rngs)` puts a `LoRA` module in the `lora` slot of every `Linear`
whose dotted module path (e.g. `language_model.layers.self_attn.q_proj`) matches one of
`cfg.targets` (regexes, `re.search`). A tower's layers are one stacked module
(models/stack.py), so a path names that projection in every layer, and its adapter is a
stacked LoRA (A [L, *in, r], B [L, r, *out]) that the layer scan slices like the kernel. The adapter adds `scale · dropout(x) · A · B` with
A [*in, r] (PEFT's kaiming-uniform: U(±1/sqrt(fan_in))), B [r, *out] zeros, scale = α / r.
Its weights are `LoRAParam`s (a subclass of `nnx.Param`) so filters separate them from the
base weights: `trainable_filter(cfg)` selects what gets gradients and optimizer state.

The reference model is the same base weights with the adapters zeroed (`x · 0 = 0` exactly,
so the reference equals the base bit for bit; `perpo_jax.train.state.reference_state`),
no second copy of the base.
`merge_lora(model)` folds scale · A · B into the kernels and empties the slots for export.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from perpo_jax.mesh import variable_axes
from perpo_jax.models.stack import is_stacked, stack_modules


class LoRAParam(nnx.Param):
    """A low-rank adapter weight (trainable when LoRA is on); distinct from base `nnx.Param`."""


class LoRA(nnx.Module):
    """Low-rank update for a `Linear` with kernel [*in_shape, *out_shape].

    x [..., *in_shape] -> scale · dropout(x) · A · B  [..., *out_shape], computed in x's dtype
    (A, B are stored in `param_dtype`, float32 master weights under bf16 compute).
    Dropout is active only in train mode (`nnx.view(model, deterministic=False)`).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        in_axes: Sequence[str | None],
        out_axes: Sequence[str | None],
        rank: int,
        alpha: float,
        dropout: float,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {rank}")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.scale = float(alpha) / rank
        bound = 1.0 / math.sqrt(math.prod(self.in_shape))  # kaiming_uniform(a=sqrt(5)) as PEFT
        a = jax.random.uniform(
            rngs.params(), self.in_shape + (rank,), jnp.float32, -bound, bound
        ).astype(param_dtype)
        self.a = LoRAParam(a, out_sharding=(*in_axes, "lora_rank"), eager_sharding=False)
        self.b = LoRAParam(
            jnp.zeros((rank,) + self.out_shape, param_dtype),
            out_sharding=("lora_rank", *out_axes),
            eager_sharding=False,
        )
        # its own stream tagged "dropout", so the step can reseed it: nnx.reseed(m, dropout=key)
        stream = nnx.RngStream(rngs.dropout(), tag="dropout")
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=stream)

    def __call__(self, x):
        n_in = len(self.in_shape)
        h = jnp.tensordot(self.dropout(x), self.a[...].astype(x.dtype), axes=n_in)
        return jnp.tensordot(h, self.b[...].astype(x.dtype), axes=1) * jnp.asarray(
            self.scale, x.dtype
        )

    def delta(self) -> jax.Array:
        """scale · A · B as a float32 kernel update [*in_shape, *out_shape] ([L, ...] for a
        stacked adapter: one update per layer)."""
        a = self.a[...].astype(jnp.float32)
        b = self.b[...].astype(jnp.float32)

        def one(a, b):
            return jnp.tensordot(a, b, axes=1) * self.scale

        stacked = a.ndim > len(self.in_shape) + 1
        return jax.vmap(one)(a, b) if stacked else one(a, b)


def module_path(path) -> str:
    """nnx path parts -> dotted string, the form LoRA target regexes match."""
    return ".".join(str(p) for p in path)


def lora_slots(model) -> list[tuple[str, nnx.Module]]:
    """(dotted path, module) of every module with a LoRA slot (the model's `Linear`s)."""
    return [
        (module_path(path), m)
        for path, m in nnx.iter_modules(model)
        if hasattr(m, "lora") and hasattr(m, "kernel") and hasattr(m, "in_shape")
    ]


def apply_lora(model, cfg, rngs: nnx.Rngs, *, param_dtype=None):
    """Attaches a `LoRA` to every matching `Linear` of `model` (in place); returns `model`.

    cfg: `perpo_jax.config.LoraConfig` (rank, alpha, dropout, targets). A target list that
    matches no layer is an error naming the patterns and a few existing paths.
    param_dtype: dtype of A and B (and so of their optimizer state); default: the kernel's.
    Pass float32 for a bf16 base: at lr 5e-6 a bf16 adapter update rounds away.
    """
    patterns = [re.compile(t) for t in cfg.targets]
    slots = lora_slots(model)
    chosen = [(p, m) for p, m in slots if any(pat.search(p) for pat in patterns)]
    if not chosen:
        sample = ", ".join(p for p, _ in slots[:6])
        raise ValueError(f"lora.targets {list(cfg.targets)} match no Linear layer (paths: {sample}, ...)")
    for path, linear in chosen:
        if linear.lora is not None:
            raise ValueError(f"{path} already has a LoRA adapter")
        axes = variable_axes(linear.kernel) or (None,) * linear.kernel[...].ndim
        layers = None
        if is_stacked(linear.kernel):  # one adapter per layer of a stacked tower, stacked too
            layers, axes = linear.kernel[...].shape[0], axes[1:]
        n_in = len(linear.in_shape)

        def make(linear=linear, axes=axes, n_in=n_in):
            return LoRA(linear.in_shape, linear.out_shape, in_axes=axes[:n_in],
                        out_axes=axes[n_in:], rank=cfg.rank, alpha=cfg.alpha,
                        dropout=cfg.dropout, rngs=rngs,
                        param_dtype=param_dtype or linear.kernel[...].dtype)

        linear.lora = nnx.data(make() if layers is None else stack_modules(make, layers))
    return model


def merge_lora(model):
    """Folds every adapter into its kernel (kernel += scale · A · B in float32) and removes it.

    In place; returns `model`, now a plain base model (export with `hf.save_pretrained`).
    """
    for _, linear in lora_slots(model):
        if linear.lora is None:
            continue
        kernel = linear.kernel[...]
        merged = kernel.astype(jnp.float32) + linear.lora.delta()
        linear.kernel.set_value(merged.astype(kernel.dtype))
        linear.lora = None
    return model


def path_regex_filter(patterns: Sequence[str]):
    """nnx filter: `nnx.Param`s whose dotted path matches one of `patterns` (module paths)."""
    compiled = [re.compile(p) for p in patterns]

    def matches(path, value) -> bool:
        if not isinstance(value, nnx.Param) or isinstance(value, LoRAParam):
            return False
        # match the owning module's path (an anchored `projector$` works) or the full path
        names = (module_path(path[:-1]), module_path(path))
        return any(pat.search(n) for pat in compiled for n in names)

    return matches


def trainable_filter(cfg):
    """nnx filter of the variables that get gradients and optimizer state.

    LoRA on: the adapters plus params under modules matching `cfg.trainable`.
    LoRA off (`cfg` None or `cfg.enabled` False): every `nnx.Param` (full fine-tune).
    """
    if cfg is None or not cfg.enabled:
        return nnx.Param
    if not cfg.trainable:
        return LoRAParam
    return nnx.Any(LoRAParam, path_regex_filter(cfg.trainable))


