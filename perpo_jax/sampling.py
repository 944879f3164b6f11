"""Generation with a KV cache: the prompt is prefilled once, K samples share it.

`sample(model, prompts_batch, num_samples=K, max_new_tokens=R, ...)` runs, inside ONE jitted
function,

1. `model.embed` + `model.prefill` once per prompt (image and text) → `PrefixKV` [B, P];
2. the first token of every sample from the logits at the last REAL prompt position
   (rows have different prompt lengths);
3. a `lax.while_loop` over `model.extend(token, prefix=prefix_kv, cache=group_cache,
   cache_index=i)` with G = K groups: the prompt's K/V are shared by the K samples (the
   attention einsum broadcasts over G, nothing is copied) and each sample owns a
   `GroupCache` of length R. Positions continue from each row's prompt length. The loop
   stops once every sample has emitted EOS (or after R tokens).

Random stream (so that "K samples with a shared prefill" equals "K independent single
sample runs"): sample k of batch row b owns the key `sample_keys(rng, B, K)[b, k] =
fold_in(fold_in(rng, b), k)`, and its t-th generated token (t = 0 for the token drawn from
the prompt) is drawn with `fold_in(that_key, t)`. Passing those per-sample keys as `rng`
(shape [B, K]) reproduces any sample in a smaller run.

The jitted function is built once per (model graph, K, R, greedy, eos ids, pad id, mesh,
image or not) by an `lru_cache`d builder; `jax.jit` then compiles once per (B, P) shape.
`temperature` and `top_p` are traced, so changing them does not recompile (only switching
to or from greedy does). `prefill_program` / `decode_step_program` jit steps 1-2 and ONE
loop iteration on their own, from the same functions (`perpo-jax plan` compiles them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from perpo_jax.mesh import logical_sharding, traced_under_mesh
from perpo_jax.scoring import IMAGE_KEYS, embed_prompts


@struct.dataclass
class SampleResult:
    """Generated responses, right-padded with `pad_id` after EOS.

    tokens:  [B, K, R] int32 — sample k of prompt b; slots after EOS (or unused) hold pad_id.
    lengths: [B, K] int32 — tokens generated, EOS included.
    mask:    [B, K, R] bool — True on the first `lengths[b, k]` slots (a scoring
             `response_mask`).
    """

    tokens: jax.Array
    lengths: jax.Array
    mask: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static (hashable) settings that shape the traced program."""

    num_samples: int
    max_new_tokens: int
    greedy: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    mesh: Mesh | None
    has_pixels: bool  # any image inputs (a separate program from text-only prompts)
    suppress_ids: tuple[int, ...] = ()


def suppress(logits: jax.Array, ids: tuple[int, ...]) -> jax.Array:
    """Tokens that must never be generated (e.g. the `<image>` placeholder: a sampled one
    would be taken for an image slot when the candidate is scored) get -inf logits."""
    if not ids:
        return logits
    return logits.at[..., jnp.asarray(ids, jnp.int32)].set(-jnp.inf)


def sample_keys(rng: jax.Array, batch: int, num_samples: int) -> jax.Array:
    """Per-sample stream keys [batch, num_samples]: key[b, k] = fold_in(fold_in(rng, b), k)."""
    rng = _as_typed_key(rng)
    rows = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch))
    return jax.vmap(lambda r: jax.vmap(lambda k: jax.random.fold_in(r, k))(jnp.arange(num_samples)))(
        rows
    )


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filter over the last axis: logits [..., V] f32 → same, dropped tokens = -inf.

    Keeps the most probable tokens whose probability mass BEFORE them is < top_p (so the
    top token always survives; ties with the smallest kept probability survive too).
    top_p >= 1 keeps everything.
    """

    def nucleus(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        sorted_probs = jnp.flip(jnp.sort(probs, axis=-1), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = mass_before < top_p
        threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(probs >= threshold, logits, -jnp.inf)

    # cond, not where: the vocabulary sort is skipped at run time when top_p >= 1
    return jax.lax.cond(jnp.asarray(top_p) >= 1.0, lambda lg: lg, nucleus, logits)


def draw_tokens(
    logits_bkv: jax.Array,
    keys_bk: jax.Array,
    step: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    greedy: bool,
) -> jax.Array:
    """One token per sample: logits [B, K, V] f32, keys [B, K] → [B, K] int32.

    Greedy = argmax; otherwise temperature scaling, nucleus filter, then a categorical draw
    by inverting the cumulative distribution at one uniform u in (0, 1] per sample from
    `fold_in(keys[b, k], step)` (as torch.multinomial does): the token is the first whose
    cumulative probability reaches u · total, so a zero-probability token is never drawn.
    One random number per sample instead of V Gumbel draws (`jax.random.categorical`), which
    took ~3/4 of the temperature mode's decode-time overhead over greedy.
    """
    if greedy:
        return jnp.argmax(logits_bkv, axis=-1).astype(jnp.int32)
    scaled = top_p_filter(logits_bkv.astype(jnp.float32) / temperature, top_p)
    step_keys = jax.vmap(jax.vmap(lambda key: jax.random.fold_in(key, step)))(keys_bk)
    u_bk = 1.0 - jax.vmap(jax.vmap(jax.random.uniform))(step_keys)  # [0, 1) -> (0, 1]
    cdf_bkv = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)
    below = cdf_bkv < (u_bk * cdf_bkv[..., -1])[..., None]
    return jnp.sum(below, axis=-1).astype(jnp.int32)


def _as_typed_key(rng: jax.Array) -> jax.Array:
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def _constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Sharding hint by logical names (a no-op without a mesh; non-divisible dims replicate)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, x.shape, mesh))


def _constrain_kv(kv: Any, axes_kv: tuple, axes_mask: tuple, mesh: Mesh | None) -> Any:
    """Applies `_constrain` to a PrefixKV / GroupCache (k, v: [L, ...] stacked over layers)."""
    if mesh is None:
        return kv
    return kv.replace(k=_constrain(kv.k, axes_kv, mesh), v=_constrain(kv.v, axes_kv, mesh),
                      mask=_constrain(kv.mask, axes_mask, mesh))


_CACHE_AXES = ("layers", "batch", "candidates", "length", "kv_heads", "head_dim")
_CACHE_MASK_AXES = ("batch", "candidates", "length")
_PREFIX_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
_PREFIX_MASK_AXES = ("batch", "length")


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    done = jnp.zeros(tokens.shape, bool)
    for eos in eos_ids:
        done = done | (tokens == eos)
    return done


def _prefill_first_token(model, spec, prompt_ids, prompt_mask, images, keys, temperature, top_p):
    """Prefill once → (PrefixKV, prompt_len [B] int32, first tokens [B, K] int32)."""
    b, p = prompt_ids.shape
    mask = prompt_mask.astype(bool)
    embeds = embed_prompts(model, prompt_ids, images)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
    hidden, prefix = model.prefill(embeds, mask, positions)
    prefix = _constrain_kv(prefix, _PREFIX_AXES, _PREFIX_MASK_AXES, spec.mesh)
    prompt_len = mask.sum(axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = model.logits(last)[:, None, :]  # [B, 1, V]
    logits = jnp.broadcast_to(logits, (b, spec.num_samples, logits.shape[-1]))
    first = draw_tokens(suppress(logits, spec.suppress_ids), keys, jnp.int32(0), temperature,
                        top_p, spec.greedy)
    return prefix, prompt_len, first


def _start(model, spec, prompt_ids, prompt_mask, images, keys, temperature, top_p):
    """Prefill and the first token → (PrefixKV, prompt_len [B], the decode loop's carry:
    (step, GroupCache [B, K, R], tokens [B, K, R], last [B, K], done [B, K], lengths [B, K]))."""
    b, k, r = prompt_ids.shape[0], spec.num_samples, spec.max_new_tokens
    prefix, prompt_len, first = _prefill_first_token(
        model, spec, prompt_ids, prompt_mask, images, keys, temperature, top_p
    )
    tokens = jnp.full((b, k, r), spec.pad_id, jnp.int32).at[:, :, 0].set(first)
    cache = _constrain_kv(model.init_cache(b, k, r), _CACHE_AXES, _CACHE_MASK_AXES, spec.mesh)
    carry = (jnp.int32(0), cache, tokens, first, _is_eos(first, spec.eos_ids), jnp.ones((b, k), jnp.int32))
    return prefix, prompt_len, carry


def _decode_step(model, spec, prefix, prompt_len, keys, temperature, top_p, carry):
    """One iteration of the decode loop: feed token `step` (already in `tokens`), draw
    token `step + 1`. Returns the next carry (see `_start`)."""
    step, cache, tokens, last, done, lengths = carry
    b, k = last.shape
    active = ~done
    embeds = model.embed(last)[:, :, None, :]  # [B, K] ids read as [B, T=K] → [B, K, 1, D]
    positions = jnp.broadcast_to((prompt_len + step)[:, None, None], (b, k, 1))
    hidden, cache = model.extend(
        embeds, positions, active[:, :, None], prefix=prefix, cache=cache, cache_index=step
    )
    cache = _constrain_kv(cache, _CACHE_AXES, _CACHE_MASK_AXES, spec.mesh)
    logits = model.logits(hidden[:, :, 0])  # [B, K, V]
    nxt = draw_tokens(suppress(logits, spec.suppress_ids), keys, step + 1, temperature, top_p,
                      spec.greedy)
    nxt = jnp.where(active, nxt, spec.pad_id)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, :, None], (0, 0, step + 1))
    done = done | (active & _is_eos(nxt, spec.eos_ids))
    return step + 1, cache, tokens, nxt, done, lengths + active.astype(jnp.int32)


def _generate(graphdef, spec: SamplerSpec, state, prompt_ids, prompt_mask, images, keys,
              temperature, top_p) -> SampleResult:
    """The traced program: prefill, then the decode loop. Shapes as in `sample`."""
    model = nnx.merge(graphdef, state)
    r = spec.max_new_tokens
    prefix, prompt_len, carry = _start(model, spec, prompt_ids, prompt_mask, images, keys,
                                       temperature, top_p)

    def keep_going(carry):
        step, _, _, _, done, _ = carry
        return (step < r - 1) & ~jnp.all(done)

    body = functools.partial(_decode_step, model, spec, prefix, prompt_len, keys, temperature,
                             top_p)
    _, _, tokens, _, _, lengths = jax.lax.while_loop(keep_going, body, carry)
    tokens = _constrain(tokens, ("batch", "candidates", "length"), spec.mesh)
    mask = jnp.arange(r, dtype=jnp.int32)[None, None, :] < lengths[:, :, None]
    return SampleResult(tokens=tokens, lengths=lengths, mask=mask)


def _prefill_alone(graphdef, spec, state, *args):
    return _start(nnx.merge(graphdef, state), spec, *args)


def _decode_step_alone(graphdef, spec, state, *args):
    return _decode_step(nnx.merge(graphdef, state), spec, *args)


def prefill_program(graphdef: nnx.GraphDef, spec: SamplerSpec):
    """jax.jit of the sampler's part before its loop, on its own (to compile and measure it:
    `perpo-jax plan`): (state, prompt_ids, prompt_mask, images, keys, temperature, top_p)
    → (PrefixKV, prompt_len, carry), the very `_start` that `_generate` runs."""
    return jax.jit(traced_under_mesh(functools.partial(_prefill_alone, graphdef, spec), spec.mesh))


def decode_step_program(graphdef: nnx.GraphDef, spec: SamplerSpec):
    """jax.jit of ONE decode-loop iteration (`_decode_step`, as `_generate`'s loop body):
    (state, prefix, prompt_len, keys, temperature, top_p, carry) → carry. The carry is
    donated, as the loop updates its cache and tokens in place."""
    return jax.jit(traced_under_mesh(functools.partial(_decode_step_alone, graphdef, spec),
                                     spec.mesh), donate_argnums=(6,))


@functools.lru_cache(maxsize=32)
def compiled_sampler(graphdef: nnx.GraphDef, spec: SamplerSpec):
    """jax.jit of the whole sampler for one model graph and static settings.

    Cached per (graphdef, spec); `jax.jit` then caches one executable per input shape, so a
    (B, P, K, R) shape is traced and compiled once.
    """
    return jax.jit(traced_under_mesh(functools.partial(_generate, graphdef, spec), spec.mesh))


def _check_batch(prompts_batch: dict, num_samples: int, max_new_tokens: int) -> None:
    for key in ("prompt_ids", "prompt_mask"):
        if key not in prompts_batch:
            raise KeyError(f"prompts_batch is missing {key!r} (has {sorted(prompts_batch)})")
    ids, mask = prompts_batch["prompt_ids"], prompts_batch["prompt_mask"]
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(
            f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be [B, P]"
        )
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(
            f"num_samples ({num_samples}) and max_new_tokens ({max_new_tokens}) must be >= 1"
        )
    if isinstance(mask, jax.core.Tracer):
        return
    # a global batch of a multi-process run: each process checks the rows it holds
    rows = ([np.asarray(s.data) for s in mask.addressable_shards]
            if isinstance(mask, jax.Array) else [np.asarray(mask)])
    if any(r.size and r.sum(-1).min() < 1 for r in rows):
        raise ValueError("prompt_mask has a row with no real token; every prompt needs >= 1")


def sample(
    model: Any,
    prompts_batch: dict,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    rng: jax.Array | None,
    eos_id: int | Sequence[int] | None,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    suppress_ids: Sequence[int] = (),
) -> SampleResult:
    """Samples `num_samples` responses per prompt with a shared-prefill KV cache.

    Args:
      model: an NNX model with the `perpo_jax.models` interface (`DecoderLM`, `LlavaModel`),
        or a `(graphdef, state)` pair from `nnx.split(model)`.
      prompts_batch: `prompt_ids` [B, P] int32 right-padded, `prompt_mask` [B, P] bool,
        optional `pixel_values` [B, C, H, W] f32 (NCHW, as HF image processors output; anyres:
        [B, N, C, H, W] with `image_sizes` [B, 2] int32).
      num_samples: K samples per prompt.
      max_new_tokens: R, the response length (EOS included).
      temperature: 0 → greedy (argmax); else logits / temperature before the nucleus filter.
      top_p: nucleus mass in (0, 1]; 1 keeps the whole vocabulary.
      rng: a PRNG key (typed or raw uint32), or per-sample stream keys [B, K] (see the module
        docstring for the stream definition). May be None only for greedy decoding.
      eos_id: id or ids that end a sample; None never stops early.
      pad_id: written after EOS.
      suppress_ids: token ids never generated (their logits are set to -inf), e.g. the
        image token.
      mesh: when given, batch arrays are placed with the batch dim over (data, fsdp) (as
        `perpo_jax.mesh.batch_sharding`; replicated if B does not divide) and the KV caches
        are constrained likewise; parameters must already be placed by the caller.

    Returns:
      SampleResult(tokens [B, K, R] int32, lengths [B, K] int32, mask [B, K, R] bool).
    """
    _check_batch(prompts_batch, num_samples, max_new_tokens)
    graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
    greedy = float(temperature) == 0.0
    if rng is None and not greedy:
        raise ValueError("rng is required when temperature > 0 (sampling)")
    if not greedy and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    eos_ids = () if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    images = {k: prompts_batch[k] for k in IMAGE_KEYS if prompts_batch.get(k) is not None}
    spec = SamplerSpec(num_samples, max_new_tokens, greedy, eos_ids, int(pad_id), mesh,
                       bool(images), tuple(int(i) for i in suppress_ids))
    prompt_ids, prompt_mask, *placed = _place_batch(
        (prompts_batch["prompt_ids"], prompts_batch["prompt_mask"], *images.values()), mesh)
    images = dict(zip(images, placed))
    keys = _stream_keys(rng, prompt_ids.shape[0], num_samples)
    fn = compiled_sampler(graphdef, spec)
    return fn(state, prompt_ids.astype(jnp.int32), prompt_mask.astype(bool), images, keys,
              jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p))


def _stream_keys(rng: jax.Array | None, batch: int, num_samples: int) -> jax.Array:
    """[B, K] typed keys from a single key, per-sample keys, or None (greedy: unused)."""
    if rng is None:
        return sample_keys(jax.random.key(0), batch, num_samples)
    rng = _as_typed_key(rng)
    if rng.shape == ():
        return sample_keys(rng, batch, num_samples)
    if rng.shape != (batch, num_samples):
        raise ValueError(
            f"rng must be one key or per-sample keys [B, K] = {(batch, num_samples)}, got {rng.shape}"
        )
    return rng


def _place_batch(batch: tuple, mesh: Mesh | None) -> tuple:
    """Batch arrays onto the mesh, leading dim over (data, fsdp); unchanged without a mesh."""
    def place(x):
        if x is None:
            return None
        x = jnp.asarray(x)
        if mesh is None:
            return x
        axes = ("batch",) + (None,) * (x.ndim - 1)
        return jax.device_put(x, logical_sharding(axes, x.shape, mesh))

    return tuple(place(x) for x in batch)
