"""Log-probabilities of K candidate responses per list, the image + prompt run ONCE per list.

A list batch (docs/internals.md) holds per list b:
`prompt_ids [B, P]` int32 / `prompt_mask [B, P]` bool (right-padded, image tokens expanded),
optional `pixel_values [B, C, H, W]` (anyres: `[B, N, C, H, W]` + `image_sizes [B, 2]`, so
prompts differ in length), and candidates `response_ids [B, K, R]` int32 /
`response_mask [B, K, R]` bool (right-padded). Candidate k of list b is the text that follows
the L_b = sum(prompt_mask[b]) real prompt tokens: its token r sits at position L_b + r and is
predicted by the hidden state at position L_b + r - 1 (token 0 by the last REAL prompt token).

Two paths compute the same numbers:
- shared prefix (default): `embed` + `prefill` of the prompt once per list, then ONE `extend`
  call with the K candidates as groups attending to the shared prefix K/V (gradients flow
  through the prefix). Cost: vision tower + P prompt tokens once, K·R candidate tokens.
- naive: prompt + response concatenated and repeated K times (image included per copy), one
  plain forward; the way every other framework does it. Kept for parity tests and benchmarks.

Log-softmax is computed in float32 as `logit[target] - logsumexp(logits)`, so the [.., V]
logits are the only vocabulary-sized tensor materialised.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]


def prompt_lengths(prompt_mask: jax.Array) -> jax.Array:
    """[B, P] bool (right-padded) -> [B] int32 number of real prompt tokens."""
    return prompt_mask.astype(jnp.int32).sum(axis=-1)


def target_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] in float32.

    logits [..., V]; targets [...] int with the same leading shape. Returns [...] float32.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def response_token_logps(model, batch: Batch, *, shared_prefix: bool = True) -> jax.Array:
    """Per-token log-probs of every candidate response token.

    Returns [B, K, R] float32, exactly 0 where `response_mask` is False.
    """
    _check_batch(batch)
    if shared_prefix:
        token_logps = _shared_prefix_token_logps(model, batch)
    else:
        token_logps = _naive_token_logps(model, batch)
    return jnp.where(batch["response_mask"], token_logps, 0.0)


def list_logprobs(model, batch: Batch, *, shared_prefix: bool = True) -> jax.Array:
    """SUM of the log-probs of each candidate's response tokens: [B, K] float32.

    Padded candidates (response_mask all False) score exactly 0.
    """
    return response_token_logps(model, batch, shared_prefix=shared_prefix).sum(axis=-1)


def _check_batch(batch: Batch) -> None:
    for key in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        if key not in batch:
            raise KeyError(f"list batch is missing {key!r} (has {sorted(batch)})")
    b, p = batch["prompt_ids"].shape
    if batch["prompt_mask"].shape != (b, p):
        raise ValueError(f"prompt_mask shape {batch['prompt_mask'].shape} != prompt_ids {(b, p)}")
    rid, rmask = batch["response_ids"], batch["response_mask"]
    if rid.ndim != 3 or rid.shape[0] != b or rmask.shape != rid.shape:
        raise ValueError(
            f"response_ids {rid.shape} / response_mask {rmask.shape} must both be [B={b}, K, R]"
        )


# A batch's image inputs, as `processor.image_inputs` makes them (image_sizes: anyres only).
IMAGE_KEYS = ("pixel_values", "image_sizes")


def embed_prompts(model, ids_bt, images: dict, repeat: int = 1) -> jax.Array:
    """model.embed of ids [B·repeat, T] with the images of `images` ("pixel_values"
    [B, C, H, W] or anyres [B, N, C, H, W] + "image_sizes" [B, 2]; none: text only), each
    image repeated `repeat` times in a row (list-major, like naive scoring's copies)."""
    pixels = images.get("pixel_values")
    if pixels is None:
        return model.embed(ids_bt)
    sizes = images.get("image_sizes")
    if repeat > 1:
        pixels = jnp.repeat(pixels, repeat, axis=0)
        sizes = None if sizes is None else jnp.repeat(sizes, repeat, axis=0)
    return model.embed(ids_bt, pixels, sizes)


def _shared_prefix_token_logps(model, batch: Batch) -> jax.Array:
    """Prefix-shared path: prompt once per list, K candidates as groups of one `extend`."""
    prompt_mask = batch["prompt_mask"].astype(bool)
    response_ids = batch["response_ids"]
    b, k, r = response_ids.shape
    embeds = embed_prompts(model, batch["prompt_ids"], batch)
    hidden, prefix = model.prefill(embeds, prompt_mask)
    plen = prompt_lengths(prompt_mask)

    # Token 0 of every candidate: predicted by the last REAL prompt position (one [B, V] row).
    last = jnp.take_along_axis(hidden, jnp.maximum(plen - 1, 0)[:, None, None], axis=1)[:, 0]
    last_logits = model.logits(last).astype(jnp.float32)  # [B, V]
    first = jnp.take_along_axis(last_logits, response_ids[:, :, 0], axis=-1)  # [B, K]
    first = first - jax.nn.logsumexp(last_logits, axis=-1)[:, None]
    if r == 1:
        return first[:, :, None]

    # Tokens 1..R-1: predicted by candidate tokens 0..R-2 (the last token predicts nothing).
    inputs = response_ids[:, :, :-1]
    cand = model.embed(inputs.reshape(b, k * (r - 1))).reshape(b, k, r - 1, -1)
    positions = plen[:, None, None] + jnp.arange(r - 1, dtype=jnp.int32)[None, None, :]
    cand_hidden, _ = model.extend(
        cand, jnp.broadcast_to(positions, (b, k, r - 1)), batch["response_mask"][:, :, :-1],
        prefix=prefix,
    )
    rest = target_logps(model.logits(cand_hidden), response_ids[:, :, 1:])  # [B, K, R-1]
    return jnp.concatenate([first[:, :, None], rest], axis=-1)


def naive_sequences(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Prompt + candidate concatenated per candidate: ids, mask [B, K, P + R].

    Candidate k of list b starts right after the L_b real prompt tokens, so its tokens keep
    the positions L_b + r of the shared path; the tail is padding (mask False).
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"].astype(bool)
    response_ids, response_mask = batch["response_ids"], batch["response_mask"].astype(bool)
    b, p = prompt_ids.shape
    _, k, r = response_ids.shape
    plen = prompt_lengths(prompt_mask)
    j = jnp.arange(p + r, dtype=jnp.int32)[None, :]  # [1, T]
    in_prompt = j < plen[:, None]  # [B, T]
    offset = j - plen[:, None]  # response index at position j
    in_response = (offset >= 0) & (offset < r)
    take = jnp.broadcast_to(jnp.clip(offset, 0, r - 1)[:, None, :], (b, k, p + r))
    resp_tok = jnp.take_along_axis(response_ids, take, axis=-1)
    resp_ok = jnp.take_along_axis(response_mask, take, axis=-1) & in_response[:, None, :]
    prompt_tok = jnp.pad(prompt_ids, ((0, 0), (0, r)))[:, None, :]
    ids = jnp.where(in_prompt[:, None, :], prompt_tok, jnp.where(resp_ok, resp_tok, 0))
    mask = in_prompt[:, None, :] | resp_ok
    return ids.astype(jnp.int32), mask


def _naive_token_logps(model, batch: Batch) -> jax.Array:
    """Naive path: K full forwards of prompt + candidate per list (image repeated per copy)."""
    response_ids = batch["response_ids"]
    b, k, r = response_ids.shape
    ids, mask = naive_sequences(batch)
    t = ids.shape[-1]
    embeds = embed_prompts(model, ids.reshape(b * k, t), batch, repeat=k)
    hidden, _ = model.prefill(embeds, mask.reshape(b * k, t))  # [B*K, T, D], positions 0..T-1
    plen = prompt_lengths(batch["prompt_mask"])
    # Response token r of candidate (b, k) is predicted at position L_b - 1 + r: only those R
    # hidden states go through lm_head (the same numbers as logits everywhere, then picked).
    where = jnp.maximum(plen - 1, 0)[:, None] + jnp.arange(r, dtype=jnp.int32)[None, :]  # [B, R]
    where = jnp.repeat(where, k, axis=0)  # [B*K, R]
    picked = jnp.take_along_axis(hidden, where[:, :, None], axis=1)  # [B*K, R, D]
    return target_logps(model.logits(picked), response_ids.reshape(b * k, r)).reshape(b, k, r)
