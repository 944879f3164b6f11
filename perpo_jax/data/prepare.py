"""Config → the prepared dataset and its processor, and records → model inputs.

    data = prepare_data(cfg)                    # builds under cfg.data.data_dir once, then reuses
    batch = prompt_batch_for([record_example(data.val[i]) for i in range(4)], data.processor, None)

Where things live under `cfg.data.data_dir`:
    <builder name>/<config name>/<version>/...      TFDS array_record files
    processors/<dataset>-img<S>-p<patch>-v<vocab>/   LlavaPromptProcessor (tokenizer + image
                                                    processor) for a model without hf_path
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPImageProcessorPil

from perpo_jax.config import Config, ConfigError
from perpo_jax.data import refcoco_builders, shapes_grounding, shapes_ocr
from perpo_jax.data.batching import prompt_batch
from perpo_jax.data.processor import LlavaPromptProcessor
from perpo_jax.data.tokenizer import tokenizer_corpus, train_tokenizer
from perpo_jax.models.from_config import DEFAULT_VOCAB_SIZE, tiny_geometry, tiny_kwargs
from perpo_jax.rewards import REWARDS, parse_box

SYNTHETIC_SOURCES = ("shapes_grounding", "shapes_ocr")


@dataclasses.dataclass(frozen=True)
class DataHandle:
    """A prepared dataset.

    train / val: random-access sources (`len()`, `__getitem__(i)` → TFDS record dict);
      `val` is None for sources without a val split (official_json lists).
    processor: the `LlavaPromptProcessor` the model is trained and evaluated with.
    task: "grounding" | "ocr" (a key of `perpo_jax.rewards.REWARDS`).
    data_dir: where the dataset lives; processor_dir: the processor's files (copied into HF
      exports), None when they come from `model.hf_path`.
    skipped: entries left out under `data.skip_invalid` (`refcoco_style.Skipped`).
    """

    train: Any
    val: Any | None
    processor: Any
    task: str
    data_dir: str
    processor_dir: str | None = None
    skipped: tuple = ()


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


# ----------------------------------------------------------------------------- records


def _text(value) -> str:
    """TFDS Text features come back as bytes; the one place they become str."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    return str(value)


def record_example(record: dict) -> Example:
    """Decodes one TFDS record (any of this package's builders) into an `Example`.

    Official lists carry no `box` feature; their box is read from the answer text.
    """
    image = np.asarray(record["image"])
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"record image must be HWC uint8, got {image.shape} {image.dtype}")
    answer = _text(record["answer"])
    box = record.get("box")
    box = None if box is None else np.asarray(box, np.float32).reshape(4)
    responses = rewards = None
    if "candidates" in record:
        responses = [_text(c) for c in record["candidates"]]
        rewards = np.asarray(record["scores"], np.float32)
        if box is None:
            box = parse_box(answer)
    return Example(image=image, question=_text(record["question"]), answer=answer, box=box,
                   responses=responses, rewards=rewards)


def prompt_batch_for(examples: list[Example], processor, max_length: int | None) -> dict:
    """The sampler's prompts batch: prompt_ids [B, P] int32, prompt_mask [B, P] bool,
    pixel_values [B, C, H, W] f32. P = `max_length` (None: the longest prompt)."""
    if not examples:
        raise ValueError("prompt_batch_for needs at least one example")
    return prompt_batch(processor, [e.image for e in examples], [e.question for e in examples],
                        max_length)


# ----------------------------------------------------------------------------- data


def _slug(text: str) -> str:
    """A TFDS-config-safe name for a file path: readable stem + hash of the absolute path."""
    digest = hashlib.sha1(os.path.abspath(text).encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(text))[0].lower())
    return f"{stem.strip('_') or 'data'}_{digest}"


def _build_dataset(cfg: Config):
    """Prepares (or reuses) the TFDS dataset → (builder, skipped entries)."""
    d = cfg.data
    os.makedirs(d.data_dir, exist_ok=True)
    if d.source == "shapes_grounding":
        return shapes_grounding.build(d.data_dir, num_train=d.num_train, num_val=d.num_val,
                                      image_size=d.image_size, seed=d.seed,
                                      min_objects=d.min_objects, max_objects=d.max_objects,
                                      relations=d.relations), ()
    if d.source == "shapes_ocr":
        return shapes_ocr.build(d.data_dir, num_train=d.num_train, num_val=d.num_val,
                                image_size=d.image_size, seed=d.seed), ()

    if d.image_dir is None:
        raise ConfigError(f"data.image_dir: required for data.source={d.source!r}")
    for key, path in (("data.path", d.path), ("data.image_dir", d.image_dir)):
        if not os.path.exists(path):
            raise ConfigError(f"{key}: {path} does not exist")
    build = (refcoco_builders.build_refcoco_style if d.source == "refcoco_style"
             else refcoco_builders.build_official_lists)
    builder, skipped = build(d.data_dir, d.path, d.image_dir, name=_slug(d.path),
                             skip_invalid=d.skip_invalid)
    return builder, tuple(skipped)


def _splits(builder, source: str):
    """(train, val) random-access sources; val None where the data has no val split."""
    sources = builder.as_data_source()
    if "train" not in sources:
        raise ConfigError(f"data.source={source!r}: dataset {builder.name} has no 'train' split "
                          f"(splits: {sorted(sources)})")
    return sources["train"], sources.get("val")


def _train_tokenizer(train, vocab_size: int, out_dir: str, progress: bool):
    """A BPE tokenizer trained on the train questions + answers, saved to `out_dir`."""
    questions, answers = [], []
    for i in tqdm(range(len(train)), desc="tokenizer corpus", unit="ex", disable=not progress):
        record = train[i]
        questions.append(_text(record["question"]))
        answers.append(_text(record["answer"]))
    return train_tokenizer(tokenizer_corpus(questions, answers), vocab_size, out_dir)


def _clip_image_processor(image_size: int):
    """CLIP preprocessing (PIL backend, no torchvision) producing image_size² crops."""
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def _local_processor(cfg: Config, builder, train, progress: bool):
    """Processor for a model without hf_path: saved next to the data, reused when present."""
    image_size, patch = tiny_geometry(cfg)
    vocab = int(tiny_kwargs(cfg).get("vocab_size", DEFAULT_VOCAB_SIZE))
    name = f"{builder.name}-{builder.builder_config.name}-img{image_size}-p{patch}-v{vocab}"
    if cfg.data.tokenizer is not None:
        name += f"-tok_{_slug(cfg.data.tokenizer)}"
    out_dir = os.path.join(os.path.abspath(cfg.data.data_dir), "processors", name)
    if os.path.exists(os.path.join(out_dir, "perpo_processor.json")):
        return LlavaPromptProcessor.from_pretrained(out_dir), out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out_dir)) as scratch:
        if cfg.data.tokenizer is not None:
            tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
        else:  # trained into scratch; the processor dir keeps the one copy
            tokenizer = _train_tokenizer(train, vocab, os.path.join(scratch, "tok"), progress)
        processor = LlavaPromptProcessor(tokenizer, _clip_image_processor(image_size),
                                         patch_size=patch, vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1)
        processor.save_pretrained(out_dir)
    return LlavaPromptProcessor.from_pretrained(out_dir), out_dir


def _hf_processor(cfg: Config) -> LlavaPromptProcessor:
    """Processor of `model.hf_path`, built as transformers builds it from that directory
    (tokenizer from `data.tokenizer` when set)."""
    try:
        return LlavaPromptProcessor.from_hf(
            cfg.model.hf_path, template=cfg.data.template,
            image_aspect_ratio=cfg.data.image_aspect_ratio, tokenizer_path=cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.hf_path: {e}") from None


def prepare_data(cfg: Config, *, progress: bool = True) -> DataHandle:
    """Builds (once) and opens the dataset and processor `cfg.data` / `cfg.model` describe.

    Idempotent: the dataset's TFDS config name and the processor dir name encode every
    setting, so a second call (or another run with the same settings) reuses the files.
    TFDS shows its own per-split generation progress bar.
    """
    if cfg.data.task not in REWARDS:
        raise ConfigError(f"data.task: {cfg.data.task!r} is not a registered reward "
                          f"({', '.join(sorted(REWARDS))})")
    builder, skipped = _build_dataset(cfg)
    train, val = _splits(builder, cfg.data.source)
    if cfg.model.hf_path is not None:
        processor, processor_dir = _hf_processor(cfg), None
    else:
        processor, processor_dir = _local_processor(cfg, builder, train, progress)
    return DataHandle(train=train, val=val, processor=processor, task=cfg.data.task,
                      data_dir=os.path.abspath(cfg.data.data_dir), processor_dir=processor_dir,
                      skipped=skipped)
