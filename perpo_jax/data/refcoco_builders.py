"""TFDS builders (array_record) over local grounding files read by `refcoco_style` / `refer`.

- `RefcocoStyle`: RefCOCO-style JSONL + images -> one split per "split" value, features
      image uint8 [H, W, 3], image_path, question (official grounding prompt), sentence,
      answer "[x1, y1, x2, y2]" (2 decimals), box float32 [4] (normalised).
- `Refer`: the refer-toolkit layout (refs(<split_by>).p + instances.json + COCO images) ->
      one split per refer split (train / val / testA / testB ...), one example per
      (ref, sentence), the same features as `RefcocoStyle`.
- `CandidateLists`: the base of builders of pre-sampled lists -> split "train", features
      image, image_path, question, answer, candidates [N] (text), scores float32 [N].
- `PerpoLists`: official PerPO pre-sampled lists as a `CandidateLists`; answers and scores
      exactly as given. (`hf_preference.HfPreferenceLists`: preference parquet / arrow.)

Box frame: the readers give boxes normalised by the original image; `_grounding_example` (the
one place) converts `box` and the answer text to the configured frame ("original" or LLaVA's
"padded" square, `rewards.boxes.box_to_frame`). The `build_*` functions put the frame (and the
refer split_by) into the TFDS config name, so changing it never reuses an old dataset.

Entries skipped under `skip_invalid=True` are logged, returned by the `build_*` functions,
and kept in the dataset's metadata (`builder.info.metadata["skipped"]`), so a reused dataset
still tells which lines were left out.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from perpo_jax.data import refcoco_style, refer
from perpo_jax.data.local_builder import (FileBuilder, LocalFilesConfig, image_file_bytes,
                                          prepared_files)
from perpo_jax.data.shapes_grounding import grounding_question
from perpo_jax.data.shapes_scene import format_box
from perpo_jax.rewards.boxes import BOX_FRAMES, box_to_frame


@dataclasses.dataclass
class GroundingFilesConfig(LocalFilesConfig):
    """box_frame: frame of the stored box and answer ("original" | "padded"); split_by: which
    refs(<split_by>).p a `Refer` builder reads (annotations is then the refer dataset dir)."""

    box_frame: str = "original"
    split_by: str = "unc"


def _grounding_example(r: refcoco_style.RefExpression, box_frame: str) -> dict:
    """One TFDS example; the only place a box leaves the original frame."""
    box = box_to_frame(r.box, *r.image_size, box_frame).astype(np.float32)
    return {"image": image_file_bytes(r.image_path), "image_path": r.image_path,
            "question": grounding_question(r.sentence), "sentence": r.sentence,
            "answer": format_box(box), "box": box}


class _ReferringExpressions(FileBuilder, skip_registration=True):
    """Referring expressions with boxes, one split per record split; subclasses say how to
    `_read` the files (-> list[RefExpression] with original-frame boxes, list[Skipped])."""

    DESCRIPTION = "Referring expressions with normalised boxes."

    def _features(self) -> dict:
        return {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "image_path": tfds.features.Text(),
            "question": tfds.features.Text(),
            "sentence": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }

    def _example(self, record: refcoco_style.RefExpression) -> dict:
        return _grounding_example(record, self.builder_config.box_frame)


class RefcocoStyle(_ReferringExpressions):
    """RefCOCO-style JSONL referring expressions; pass `config=GroundingFilesConfig(...)`."""

    def _read(self):
        cfg = self.builder_config
        return refcoco_style.read_refcoco_jsonl(cfg.annotations, cfg.image_root,
                                                skip_invalid=cfg.skip_invalid)


class Refer(_ReferringExpressions):
    """refer-toolkit RefCOCO / + / g; pass `config=GroundingFilesConfig(annotations=<dir>)`."""

    def _read(self):
        cfg = self.builder_config
        return refer.read_refer(cfg.annotations, cfg.image_root, split_by=cfg.split_by,
                                skip_invalid=cfg.skip_invalid)


class CandidateLists(FileBuilder, skip_registration=True):
    """Pre-sampled candidate lists with a score each -> split "train"; subclasses say how to
    read their files (`_read_lists`). Features: image, image_path, question, answer,
    candidates [N] (text), scores float32 [N]."""

    DESCRIPTION = "Pre-sampled candidate lists with their scores."

    def _read_lists(self, skipped: list):
        """-> iterable of TFDS examples (dicts of the features above). Entries left out go
        into `skipped` (`refcoco_style.Skipped`) by the time the iterable is exhausted."""
        raise NotImplementedError

    def _features(self) -> dict:
        return {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "image_path": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "candidates": tfds.features.Sequence(tfds.features.Text()),
            "scores": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        }

    def _read(self):
        skipped: list = []
        return self._read_lists(skipped), skipped

    def _splits(self, records) -> dict:
        return {"train": records}  # streamed, never held in memory whole

    def _example(self, record: dict) -> dict:
        return record


class PerpoLists(CandidateLists):
    """Official PerPO pre-sampled candidate lists; pass `config=LocalFilesConfig(...)`."""

    DESCRIPTION = "Pre-sampled candidate lists with their IoU scores."

    def _read_lists(self, skipped: list):
        cfg = self.builder_config
        records, bad = refcoco_style.read_official_lists(
            cfg.annotations, cfg.image_root, skip_invalid=cfg.skip_invalid)
        skipped.extend(bad)
        return ({"image": image_file_bytes(r.image_path), "image_path": r.image_path,
                 "question": r.question, "answer": r.answer,
                 "candidates": list(r.candidates), "scores": r.scores} for r in records)


def _check_frame(box_frame: str) -> str:
    if box_frame not in BOX_FRAMES:
        raise ValueError(f"box_frame must be one of {BOX_FRAMES}, got {box_frame!r}")
    return box_frame


def build_refcoco_style(data_dir: str, annotations: str, image_root: str, *, name: str = "default",
                        box_frame: str = "original", skip_invalid: bool = False):
    """Prepare (or reuse) `refcoco_style/<name>_<box_frame>` -> (builder, list[Skipped])."""
    config = GroundingFilesConfig(
        name=f"{name}_{_check_frame(box_frame)}", annotations=annotations, image_root=image_root,
        skip_invalid=skip_invalid, box_frame=box_frame)
    return prepared_files(RefcocoStyle, data_dir, config)


def build_refer(data_dir: str, refer_dir: str, image_root: str, *, split_by: str = "unc",
                name: str = "default", box_frame: str = "original", skip_invalid: bool = False):
    """Prepare (or reuse) `refer/<name>_<split_by>_<box_frame>` -> (builder, list[Skipped]).

    refer_dir holds refs(<split_by>).p and instances.json; image_root the COCO train2014 images.
    """
    if split_by not in refer.SPLIT_BYS:
        raise ValueError(f"split_by must be one of {refer.SPLIT_BYS}, got {split_by!r}")
    config = GroundingFilesConfig(
        name=f"{name}_{split_by}_{_check_frame(box_frame)}", annotations=refer_dir,
        image_root=image_root, skip_invalid=skip_invalid, box_frame=box_frame, split_by=split_by)
    return prepared_files(Refer, data_dir, config)


def build_official_lists(data_dir: str, path: str, image_root: str, *, name: str = "default",
                         skip_invalid: bool = False):
    """Prepare (or reuse) `perpo_lists/<name>` -> (builder, list[Skipped])."""
    config = LocalFilesConfig(name=name, annotations=path, image_root=image_root,
                              skip_invalid=skip_invalid)
    return prepared_files(PerpoLists, data_dir, config)
