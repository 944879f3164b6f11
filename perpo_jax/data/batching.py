"""Right-padding of token id sequences into the fixed-shape arrays of a list batch.

Layout (docs/internals.md): `prompt_ids [B, P]` int32 + `prompt_mask [B, P]` bool,
`response_ids [B, K, R]` int32 + `response_mask [B, K, R]` bool, all right-padded.

Prompts are never truncated (cutting image tokens would break the image merge): a prompt
longer than P is an error naming the example. Responses longer than R are truncated (the
EOS is then lost) and COUNTED in the returned value so callers can report it.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


PROMPT_BUCKET = 32  # prompt length rounded up to a multiple of this: few distinct jit shapes


def bucketed(n: int, bucket: int = PROMPT_BUCKET) -> int:
    """`n` rounded up to a multiple of `bucket` (padded widths → few compilations)."""
    return -(-n // bucket) * bucket


class PromptTooLongError(ValueError):
    """A prompt (image tokens included) does not fit the prompt length."""


@dataclasses.dataclass(frozen=True)
class PaddedResponses:
    """ids [B, K, R] int32, mask [B, K, R] bool, present [B, K] bool (candidate exists),
    num_truncated: how many responses were longer than R and cut."""

    ids: np.ndarray
    mask: np.ndarray
    present: np.ndarray
    num_truncated: int


def pad_prompts(prompts: Sequence[Sequence[int]], length: int | None, pad_id: int,
                names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad B prompts to `length` (None: the longest prompt).

    Returns (ids [B, P] int32, mask [B, P] bool). Raises PromptTooLongError naming the
    example (`names[b]` if given, else its position b) when a prompt exceeds `length`.
    """
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for b, p in enumerate(prompts):
        if len(p) > length:
            who = names[b] if names is not None else f"batch position {b}"
            raise PromptTooLongError(
                f"prompt of {who} has {len(p)} tokens (image tokens included) > max prompt "
                f"length {length}; prompts are never truncated: raise the max length")
        ids[b, : len(p)] = p
        mask[b, : len(p)] = True
    return ids, mask


def pad_responses(responses: Sequence[Sequence[Sequence[int]]], length: int | None,
                  pad_id: int, num_candidates: int | None = None) -> PaddedResponses:
    """Right-pad B lists of candidate responses to [B, K, R].

    K = `num_candidates` (None: the longest list); R = `length` (None: the longest response).
    Missing candidates are all padding with `present = False`.
    """
    k = max(len(r) for r in responses) if num_candidates is None else num_candidates
    longest = max((len(c) for r in responses for c in r), default=0)
    length = longest if length is None else length
    ids = np.full((len(responses), k, length), pad_id, np.int32)
    mask = np.zeros((len(responses), k, length), bool)
    present = np.zeros((len(responses), k), bool)
    truncated = 0
    for b, cands in enumerate(responses):
        if len(cands) > k:
            raise ValueError(f"batch position {b} has {len(cands)} candidates > K={k}")
        for j, c in enumerate(cands):
            truncated += len(c) > length
            c = list(c)[:length]
            ids[b, j, : len(c)] = c
            mask[b, j, : len(c)] = True
            present[b, j] = True
    return PaddedResponses(ids, mask, present, int(truncated))


def prompt_batch(processor, images: Sequence, questions: Sequence[str], length: int | None,
                 names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """{"pixel_values" [B, C, H, W] f32 (anyres: [B, N, C, H, W] + "image_sizes" [B, 2] i32),
    "prompt_ids" [B, P] i32, "prompt_mask" [B, P] bool}: each prompt's image tokens are as
    many as its own image gives (anyres prompts differ in length), right-padded to P.

    `processor` is a `LlavaPromptProcessor`; `names` label examples in length errors.
    """
    inputs = processor.image_inputs(list(images))
    prompts = processor.encode_prompts(list(questions), inputs)
    ids, mask = pad_prompts(prompts, length, processor.tokenizer.pad_token_id, names)
    return {**inputs, "prompt_ids": ids, "prompt_mask": mask}
