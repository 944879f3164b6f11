"""Config → the prepared dataset and its processor.

    data = prepare_data(cfg)                    # builds under cfg.data.data_dir once, then reuses
    data.val[0]                                 # a TFDS record; `data.examples` decodes it

Where things live under `cfg.data.data_dir`:
    <builder name>/<config name>/<version>/...      TFDS array_record files; for file sources
                                                    the config name is <file stem>_<content
                                                    key> (see `_dataset_name`)
    processors/<dataset>-img<S>-p<patch>-v<vocab>/   LlavaPromptProcessor (tokenizer + image
                                                    processor) for a model without hf_path
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import tempfile
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPImageProcessorPil

from perpo_jax.config import Config, ConfigError
from perpo_jax.data import (hf_preference, page_ocr, pref_files, refcoco_builders,
                             shapes_grounding, shapes_ocr, shapes_pope)
# record_example stays reachable as prepare.record_example (train/loop.py and demo call it)
from perpo_jax.data.examples import record_example, text_of  # noqa: F401
from perpo_jax.data.processor import LlavaPromptProcessor
from perpo_jax.data.tokenizer import tokenizer_corpus, train_tokenizer
from perpo_jax.assemble import DEFAULT_VOCAB_SIZE, tiny_geometry, tiny_kwargs
from perpo_jax.rewards import REWARDS

SYNTHETIC_SOURCES = ("shapes_grounding", "shapes_ocr", "shapes_pope")


@dataclasses.dataclass(frozen=True)
class DataHandle:
    """A prepared dataset.

    train / val: random-access sources (`len()`, `__getitem__(i)` → TFDS record dict);
      `val` is None for sources without a val split (official_json lists).
    processor: the `LlavaPromptProcessor` the model is trained and evaluated with.
    task: "grounding" | "ocr" | "pope" (a key of `perpo_jax.rewards.REWARDS`).
    data_dir: where the dataset lives; processor_dir: the processor's files (copied into HF
      exports), None when they come from `model.hf_path`.
    skipped: entries left out under `data.skip_invalid` (`refcoco_style.Skipped`).
    built: whether this call built the dataset (False: reused from data_dir);
      cache_reason: why, in one line (what `perpo-jax prepare-data` prints).
    train_text: the train split with images NOT decoded (same records otherwise), or None.
    """

    train: Any
    val: Any | None
    processor: Any
    task: str
    data_dir: str
    processor_dir: str | None = None
    skipped: tuple = ()
    train_text: Any | None = None
    built: bool = False
    cache_reason: str = ""


# ----------------------------------------------------------------------------- data


# Bump when what the key covers changes: every dataset is then rebuilt once.
_CACHE_KEY_VERSION = 1


def _stem(path: str) -> str:
    """The readable part of a dataset name: the file (or dir) name, TFDS-config-safe; of a
    glob of shards (hf_preference), the name of the folder holding them."""
    if not os.path.exists(path) and glob.has_magic(path):
        path = os.path.dirname(path)
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0].lower()
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "data"


def _slug(path: str, digest: str) -> str:
    """A TFDS-config-safe name: readable stem of `path` + 12 hex digits of `digest`."""
    return f"{_stem(path)}_{digest[:12]}"


def _content_digest(files: list[str], settings: dict) -> str:
    """sha256 over `settings` and the bytes of `files` (each named by its base name)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        with open(path, "rb") as f:
            file_hash = hashlib.file_digest(f, "sha256").hexdigest()
        h.update(f"{os.path.basename(path)}:{file_hash};".encode())
    return h.hexdigest()


def _source_files(cfg: Config) -> list[str]:
    """The annotation files the records are read from (for `refer`: inside data.path)."""
    d = cfg.data
    if d.source == "hf_preference":
        return pref_files.resolve_files(d.path, d.pref_split)
    if d.source != "refer":
        return [d.path]
    files = [os.path.join(d.path, f"refs({d.refer_split_by}).p"),
             os.path.join(d.path, "instances.json")]
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"data.path: {path} does not exist (data.source='refer' reads "
                              f"refs(<data.refer_split_by>).p and instances.json from data.path)")
    return files


def _dataset_name(cfg: Config) -> str:
    """The TFDS config name of a file source's dataset: <stem of data.path>_<content key>.

    The key hashes the annotation files' CONTENT and every setting that changes the records
    (source, image_dir, skip_invalid, box_frame, refer_split_by; ocr_format of page_ocr;
    hf_preference's data.pref_* columns and split), so an edited file or a
    changed setting builds a new dataset instead of serving the old records. Images are read
    by path: replacing an image file in place is not seen (delete the dataset dir).
    """
    d = cfg.data
    # page_ocr without image_dir: image paths are relative to the annotation file's dir
    image_root = d.image_dir or os.path.dirname(os.path.abspath(d.path))
    settings = {"key_version": _CACHE_KEY_VERSION, "source": d.source,
                "image_dir": os.path.abspath(image_root),
                "skip_invalid": d.skip_invalid,
                "box_frame": None if d.source == "official_json" else d.box_frame,
                "refer_split_by": d.refer_split_by if d.source == "refer" else None}
    if d.source == "page_ocr":  # only here, so other sources keep their cache keys
        settings["ocr_format"] = d.ocr_format
    if d.source == "hf_preference":
        settings["pref"] = dataclasses.asdict(_pref_columns(cfg)) | {"split": d.pref_split}
    return _slug(d.path, _content_digest(_source_files(cfg), settings))


def _tokenizer_digest(tokenizer: str) -> str:
    """Content key of a tokenizer dir (its top-level files); of the name when not a dir."""
    if not os.path.isdir(tokenizer):
        return hashlib.sha256(tokenizer.encode()).hexdigest()
    files = sorted(e.path for e in os.scandir(tokenizer) if e.is_file())
    return _content_digest(files, {"key_version": _CACHE_KEY_VERSION})


def _prepared_dirs(data_dir: str) -> set[str]:
    """Version dirs (<builder>/<config>/<version>) of the datasets already built in data_dir."""
    root = glob.escape(os.path.abspath(data_dir))
    pattern = os.path.join(root, "*", "*", "*", "dataset_info.json")
    return {os.path.realpath(os.path.dirname(p)) for p in glob.glob(pattern)}


def _cache_report(cfg: Config, builder, known: set[str]) -> tuple[bool, str]:
    """(built, why): whether this call built `builder`'s dataset, and why, in one line."""
    here = os.path.realpath(builder.data_dir)
    synthetic = cfg.data.source in SYNTHETIC_SOURCES
    if here in known:
        what = "settings" if synthetic else "annotation content and settings"
        return False, f"reused {here}: built earlier from the same {what}"
    if synthetic:
        return True, f"built {here}: no dataset with these settings in data.data_dir yet"
    same_file = re.compile(rf"^{re.escape(_stem(cfg.data.path))}_[0-9a-f]{{12}}(_|$)")
    builder_dir, config_name = os.path.split(os.path.dirname(here))
    siblings = {os.path.basename(os.path.dirname(k)) for k in known
                if os.path.dirname(os.path.dirname(k)) == builder_dir}
    older = sorted(n for n in siblings if n != config_name and same_file.match(n))
    if older:
        return True, (f"built {here}: {cfg.data.path} (its content) or a data.* setting "
                      f"changed since {', '.join(older)} was built (kept; delete it if unused)")
    return True, f"built {here}: first build of {cfg.data.path} with these settings"


def _pref_columns(cfg: Config) -> hf_preference.PreferenceColumns:
    d = cfg.data
    return hf_preference.PreferenceColumns(
        image=d.pref_image_column, prompt=d.pref_prompt_column, chosen=d.pref_chosen_column,
        rejected=d.pref_rejected_column, responses=d.pref_responses_column,
        scores=d.pref_scores_column)


def _build_dataset(cfg: Config):
    """Prepares (or reuses) the TFDS dataset → (builder, skipped entries)."""
    d = cfg.data
    os.makedirs(d.data_dir, exist_ok=True)
    if d.source == "shapes_grounding":
        return shapes_grounding.build(d.data_dir, num_train=d.num_train, num_val=d.num_val,
                                      image_size=d.image_size, seed=d.seed,
                                      min_objects=d.min_objects, max_objects=d.max_objects,
                                      relations=d.relations, sides=d.shape_sides), ()
    if d.source == "shapes_ocr":
        return shapes_ocr.build(d.data_dir, num_train=d.num_train, num_val=d.num_val,
                                image_size=d.image_size, seed=d.seed, font_size=d.ocr_font_size,
                                max_lines=d.ocr_max_lines, max_words=d.ocr_max_words,
                                pitch=d.ocr_pitch, placement=d.ocr_placement), ()
    if d.source == "shapes_pope":  # num_train / num_val count images (up to 6 questions each)
        return shapes_pope.build(d.data_dir, num_train=d.num_train, num_val=d.num_val,
                                 image_size=d.image_size, seed=d.seed,
                                 min_objects=d.min_objects, max_objects=d.max_objects), ()

    if d.source == "hf_preference":  # images embedded or by path: data.image_dir optional
        if d.image_dir is not None and not os.path.isdir(d.image_dir):
            raise ConfigError(f"data.image_dir: {d.image_dir} is not a directory")
        builder, skipped = hf_preference.build_hf_preference(
            d.data_dir, _source_files(cfg), d.image_dir, _pref_columns(cfg),
            name=_dataset_name(cfg), skip_invalid=d.skip_invalid)
        return builder, tuple(skipped)
    if d.image_dir is None and d.source != "page_ocr":  # page_ocr: the annotation file's dir
        raise ConfigError(f"data.image_dir: required for data.source={d.source!r}")
    for key, path in (("data.path", d.path), ("data.image_dir", d.image_dir)):
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"{key}: {path} does not exist")
    if d.source == "page_ocr":
        builder, skipped = page_ocr.build_page_ocr(
            d.data_dir, d.path, d.image_dir, fmt=d.ocr_format, name=_dataset_name(cfg),
            skip_invalid=d.skip_invalid)
    elif d.source == "refer":
        builder, skipped = refcoco_builders.build_refer(
            d.data_dir, d.path, d.image_dir, split_by=d.refer_split_by, name=_dataset_name(cfg),
            box_frame=d.box_frame, skip_invalid=d.skip_invalid)
    elif d.source == "refcoco_style":
        builder, skipped = refcoco_builders.build_refcoco_style(
            d.data_dir, d.path, d.image_dir, name=_dataset_name(cfg), box_frame=d.box_frame,
            skip_invalid=d.skip_invalid)
    else:  # official_json: answers and iou_scores as given, no frame conversion
        builder, skipped = refcoco_builders.build_official_lists(
            d.data_dir, d.path, d.image_dir, name=_dataset_name(cfg), skip_invalid=d.skip_invalid)
    return builder, tuple(skipped)


@contextlib.contextmanager
def _tfds_bars_off():
    """TFDS' "Generating splits... / Shuffling ..." bars off while a dataset is built
    (`prepare_data` says itself what it built or reused, and why); the caller's setting after.
    TFDS has a setter (`tfds.display_progress_bar`) but no getter: the setting is read from
    `tqdm_utils._active` (tensorflow-datasets 4.9.10)."""
    shown = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(shown)


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
        questions.append(text_of(record["question"]))
        answers.append(text_of(record["answer"]))
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
        name += f"-tok_{_slug(cfg.data.tokenizer, _tokenizer_digest(cfg.data.tokenizer))}"
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
    setting (and, for file sources, the annotation files' content), so a second call (or
    another run with the same settings and files) reuses the files; `built` / `cache_reason`
    of the result say which happened and why. TFDS' own split-generation bars stay off;
    `progress` shows the tokenizer-corpus bar (a model without hf_path, first build).
    """
    if cfg.data.task not in REWARDS:
        raise ConfigError(f"data.task: {cfg.data.task!r} is not a registered reward "
                          f"({', '.join(sorted(REWARDS))})")
    known = _prepared_dirs(cfg.data.data_dir)
    with _tfds_bars_off():
        builder, skipped = _build_dataset(cfg)
    built, cache_reason = _cache_report(cfg, builder, known)
    train, val = _splits(builder, cfg.data.source)
    if cfg.model.hf_path is not None:
        processor, processor_dir = _hf_processor(cfg), None
    else:
        processor, processor_dir = _local_processor(cfg, builder, train, progress)
    # images left as encoded bytes: a pass over the texts/scores (offline list planning)
    # then costs no image decoding
    train_text = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    return DataHandle(train=train, val=val, processor=processor, task=cfg.data.task,
                      data_dir=os.path.abspath(cfg.data.data_dir), processor_dir=processor_dir,
                      skipped=skipped, train_text=train_text, built=built,
                      cache_reason=cache_reason)
