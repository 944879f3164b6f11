"""Host-side candidate lists of one round, as fixed-shape numpy arrays (no jax here).

A `ListSet` holds L lists, already filtered, sorted and padded to K candidates:

    pixel_values  [L, C, H, W] f32     prompt_ids   [L, P] i32   prompt_mask   [L, P] bool
      (anyres: [L, N, C, H, W] and image_sizes [L, 2] i32)
    response_ids  [L, K, R]    i32     response_mask[L, K, R] bool
    rewards       [L, K]       f32     list_mask    [L, K] bool
    target_ids    [L, R]       i32     target_mask  [L, R] bool   (ground truth, for SFT)
    ref_logps     [L, K]       f32     (optional, reference log-probs computed once)
    source        [L]          i32     index of the list's prompt among the round's examples
                                       (orders lists across hosts; never part of a step batch)

Three ways to make one: from sampled candidates (online), from pre-sampled official lists
(offline), from ground-truth answers (SFT). A round's ListSet is saved to disk (atomically)
so a run resumed mid-round trains on exactly the same lists.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np

from perpo_jax import storage
from perpo_jax.atomic import atomic_file
from perpo_jax.data.batching import bucketed, pad_prompts, pad_responses
from perpo_jax.rewards import build_lists



@dataclasses.dataclass
class ListSet:
    arrays: dict[str, np.ndarray]
    stats: dict[str, float]

    def __len__(self) -> int:
        return int(self.arrays["rewards"].shape[0]) if self.arrays else 0

    def step_batch(self, indices: Sequence[int], batch_lists: int) -> dict[str, np.ndarray]:
        """The lists at `indices`, padded with EMPTY lists (list_mask False, ignored by every
        loss) up to `batch_lists` rows so the batch divides the mesh's batch axes."""
        idx = np.asarray(indices, np.int64)
        out = {}
        for name, arr in self.arrays.items():
            if name == "source":
                continue
            rows = arr[idx]
            pad = batch_lists - len(idx)
            if pad > 0:
                filler = np.zeros((pad,) + arr.shape[1:], arr.dtype)
                rows = np.concatenate([rows, filler], axis=0)
            out[name] = rows
        return out

    def with_prompt_length(self, length: int, pad_id: int) -> "ListSet":
        """Right-pads prompt_ids/prompt_mask to `length` (hosts must agree on shapes)."""
        if not self.arrays or self.arrays["prompt_ids"].shape[1] == length:
            return self
        extra = length - self.arrays["prompt_ids"].shape[1]
        if extra < 0:
            raise ValueError(f"cannot shrink prompts of {length + extra} tokens to {length}")
        arrays = dict(self.arrays)
        arrays["prompt_ids"] = np.pad(arrays["prompt_ids"], ((0, 0), (0, extra)), constant_values=pad_id)
        arrays["prompt_mask"] = np.pad(arrays["prompt_mask"], ((0, 0), (0, extra)))
        return ListSet(arrays, self.stats)

    @classmethod
    def empty(cls, shapes: dict[str, tuple[tuple[int, ...], str]], stats: dict) -> "ListSet":
        """Zero lists with the given per-row shapes/dtypes ({name: (row_shape, dtype)}): what a
        host that kept no list this round feeds into steps the other hosts do run."""
        arrays = {k: np.zeros((0,) + tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in shapes.items()}
        return cls(arrays, stats)

    def row_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (v.shape[1:], v.dtype.str) for k, v in self.arrays.items()}

    def save(self, path: str) -> None:
        """Atomic: written to a temp file in the same folder, then renamed (a gs:// path:
        uploaded as one object, which appears whole or not at all)."""
        stats = {f"stat__{k}": np.asarray(v) for k, v in self.stats.items()}
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **self.arrays, **stats)

    @classmethod
    def load(cls, path: str) -> "ListSet":
        with np.load(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("stat__")}
            stats = {k[len("stat__"):]: float(z[k]) for k in z.files if k.startswith("stat__")}
        return cls(arrays, stats)


def _prompt_arrays(processor, examples, max_prompt: int) -> dict[str, np.ndarray]:
    inputs = processor.image_inputs([ex.image for ex in examples])
    prompts = processor.encode_prompts([ex.question for ex in examples], inputs)
    # A prompt longer than max_prompt makes pad_prompts raise, naming the example: image
    # tokens are never truncated.
    length = min(bucketed(max(len(p) for p in prompts)), max_prompt)
    names = [f"example {i} ({ex.question[:40]!r})" for i, ex in enumerate(examples)]
    ids, mask = pad_prompts(prompts, length, processor.tokenizer.pad_token_id, names)
    return {**inputs, "prompt_ids": ids, "prompt_mask": mask}


def _targets(processor, examples, max_response: int) -> tuple[np.ndarray, np.ndarray, int]:
    padded = pad_responses([[processor.encode_response(ex.answer)] for ex in examples],
                           max_response, processor.tokenizer.pad_token_id, num_candidates=1)
    return padded.ids[:, 0], padded.mask[:, 0], padded.num_truncated


def lists_from_candidates(
    processor,
    examples: Sequence,
    candidates: Sequence[Sequence[str]],
    candidate_ids: Sequence[Sequence[Sequence[int]]] | None,
    rewards: Sequence[np.ndarray],
    *,
    num_candidates: int,
    min_margin: float,
    max_prompt: int,
    max_response: int,
) -> ListSet:
    """Filters/sorts/pads scored candidates into a ListSet.

    examples: B prompts (objects with .image, .question, .answer). candidates: B lists of
    response texts; candidate_ids: the token ids the policy actually produced for them (EOS
    included), or None to tokenise the texts (offline lists); rewards: B arrays [K_b].
    Lists are deduplicated, dropped below `min_margin`, sorted by reward and thinned to
    `num_candidates` (best and worst always kept) by `rewards.build_lists`.
    """
    built = build_lists(candidates, rewards, min_margin=min_margin, max_size=num_candidates)
    stats = {
        "prompts": float(len(examples)),
        "lists_kept": float(len(built.lists)),
        "duplicates_removed": float(built.duplicates_removed),
        "mean_reward": float(np.mean(np.concatenate([np.asarray(r, np.float64).ravel() for r in rewards])))
        if len(rewards) else 0.0,
        "max_reward": float(np.mean([np.max(r) for r in rewards])) if len(rewards) else 0.0,
    }
    stats.update({f"dropped_{k}": float(v) for k, v in built.dropped.items()})
    if not built.lists:
        return ListSet({}, stats)
    kept_examples = [examples[c.index] for c in built.lists]
    arrays = _prompt_arrays(processor, kept_examples, max_prompt)
    responses = []
    for c in built.lists:
        if candidate_ids is None:
            responses.append([processor.encode_response(t) for t in c.responses])
        else:
            first_ids = {}
            for text, ids in zip(candidates[c.index], candidate_ids[c.index]):
                first_ids.setdefault(text, ids)  # build_lists keeps the first of duplicates
            responses.append([first_ids[t] for t in c.responses])
    padded = pad_responses(responses, max_response, processor.tokenizer.pad_token_id,
                           num_candidates=num_candidates)
    rewards_lk, mask_lk = built.padded(num_candidates)
    target_ids, target_mask, _ = _targets(processor, kept_examples, max_response)
    arrays.update(response_ids=padded.ids, response_mask=padded.mask, rewards=rewards_lk,
                  list_mask=mask_lk, target_ids=target_ids, target_mask=target_mask,
                  source=np.asarray([c.index for c in built.lists], np.int32))
    stats["responses_truncated"] = float(padded.num_truncated)
    return ListSet(arrays, stats)


def lists_from_ground_truth(processor, examples: Sequence, *, max_prompt: int,
                            max_response: int) -> ListSet:
    """One-candidate lists holding the ground-truth answer (reward 1): the SFT data."""
    arrays = _prompt_arrays(processor, examples, max_prompt)
    target_ids, target_mask, truncated = _targets(processor, examples, max_response)
    arrays.update(
        response_ids=target_ids[:, None, :], response_mask=target_mask[:, None, :],
        rewards=np.ones((len(examples), 1), np.float32), list_mask=np.ones((len(examples), 1), bool),
        target_ids=target_ids, target_mask=target_mask,
        source=np.arange(len(examples), dtype=np.int32),
    )
    return ListSet(arrays, {"prompts": float(len(examples)), "lists_kept": float(len(examples)),
                            "responses_truncated": float(truncated)})
