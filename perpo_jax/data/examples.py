"""Decoded examples and their prompts: what training, sampling and evaluation share.

    examples = [record_example(data.val[i]) for i in range(8)]        # TFDS records -> Example
    width = prompt_length(examples, processor, prompt_limit(cfg, "eval.max_new_tokens"))
    batch = prompt_batch_for(examples, processor, width)                # sampler prompts

Prompts are never truncated: a prompt that leaves no room for the generated tokens within
`train.max_length` is a `PromptTooLongError` naming the example and the keys to raise.
`default_split` / `split_source` pick the records a command reads ("val", or "train" for
data without a val split).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from perpo_jax.config import Config, ConfigError
from perpo_jax.data.batching import PromptTooLongError, bucketed, prompt_batch
from perpo_jax.rewards import parse_box


@dataclasses.dataclass(frozen=True)
class Example:
    """One decoded record. image HWC uint8; box [4] float32 normalised or None (OCR);
    responses / rewards [N]: pre-sampled candidate list (official lists) or None."""

    image: np.ndarray
    question: str
    answer: str
    box: np.ndarray | None = None
    responses: list[str] | None = None
    rewards: np.ndarray | None = None


def text_of(value) -> str:
    """TFDS Text features come back as bytes; the one place they become str."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return text_of(value.item())
    return str(value)


def record_example(record: dict) -> Example:
    """Decodes one TFDS record (any of this package's builders) into an `Example`.

    Official lists carry no `box` feature; their box is read from the answer text.
    """
    image = np.asarray(record["image"])
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"record image must be HWC uint8, got {image.shape} {image.dtype}")
    answer = text_of(record["answer"])
    box = record.get("box")
    box = None if box is None else np.asarray(box, np.float32).reshape(4)
    responses = rewards = None
    if "candidates" in record:
        responses = [text_of(c) for c in record["candidates"]]
        rewards = np.asarray(record["scores"], np.float32)
        if box is None:
            box = parse_box(answer)
    return Example(image=image, question=text_of(record["question"]), answer=answer, box=box,
                   responses=responses, rewards=rewards)


def prompt_batch_for(examples: list[Example], processor, max_length: int | None) -> dict:
    """The sampler's prompts batch (`batching.prompt_batch`): prompt_ids [B, P] int32,
    prompt_mask [B, P] bool, pixel_values [B, C, H, W] f32 (anyres: [B, N, C, H, W] and
    image_sizes [B, 2]). P = `max_length` (None: the longest prompt)."""
    if not examples:
        raise ValueError("prompt_batch_for needs at least one example")
    return prompt_batch(processor, [e.image for e in examples], [e.question for e in examples],
                        max_length)


def prompt_limit(cfg: Config, new_tokens_key: str) -> tuple[int, str]:
    """(the longest prompt that leaves room for `new_tokens_key` generated tokens within
    `train.max_length`, that difference spelled out with its keys for error messages)."""
    section, name = new_tokens_key.split(".")
    new_tokens = getattr(getattr(cfg, section), name)
    most = cfg.train.max_length - new_tokens
    return most, (f"train.max_length - {new_tokens_key} = {cfg.train.max_length} - "
                  f"{new_tokens} = {most}")


def prompt_length(examples: list[Example], processor,
                  limit: tuple[int, str] | None = None) -> int:
    """The longest prompt (image tokens included), rounded up to the prompt bucket and capped
    at `limit` (from `prompt_limit`); a prompt longer than the limit is a PromptTooLongError
    naming the example and the key to raise (prompts are never truncated)."""
    sizes = processor.prompt_sizes([e.image for e in examples])
    lengths = [len(processor.encode_prompt(e.question, h, w)) for e, (h, w) in zip(examples, sizes)]
    longest = max(lengths)
    if limit is None:
        return bucketed(longest)
    most, spelled = limit
    if longest > most:
        i = lengths.index(longest)
        raise PromptTooLongError(
            f"prompt of example {i} ({examples[i].question[:40]!r}) has {longest} tokens (image "
            f"tokens included) > {spelled}: raise train.max_length (prompts are never truncated)")
    return min(bucketed(longest), most)


def default_split(data) -> str:
    """The split used when none is given: "val", or "train" where the data has no val split
    (official_json lists)."""
    return "val" if data.val is not None else "train"


def split_source(data, split: str, source_name: str):
    """The records of `split` ("train" | "val"); a one-line error when the data lacks it."""
    source = getattr(data, split, None) if split in ("train", "val") else None
    if source is None:
        hint = ""
        if source_name == "official_json":
            hint = (": official PerPO lists are train-only; pass --split train, or evaluate on "
                    "held-out data (data.source=refcoco_style or refer, data.path=...)")
        raise ConfigError(f"--split {split}: data.source={source_name!r} has no {split!r} "
                          f"split{hint}")
    return source
