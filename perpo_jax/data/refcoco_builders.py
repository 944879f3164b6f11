"""TFDS builders (array_record) over local grounding files read by `refcoco_style`.

- `RefcocoStyle`: RefCOCO-style JSONL + images -> one split per "split" value, features
      image uint8 [H, W, 3], image_path, question (official grounding prompt), sentence,
      answer "[x1, y1, x2, y2]" (2 decimals), box float32 [4] (normalised).
- `PerpoLists`: official PerPO pre-sampled lists -> split "train", features
      image, image_path, question, answer, candidates [N] (text), scores float32 [N].

Entries skipped under `skip_invalid=True` are logged, returned by the `build_*` functions,
and kept in the dataset's metadata (`builder.info.metadata["skipped"]`), so a reused dataset
still tells which lines were left out.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from perpo_jax.data import refcoco_style
from perpo_jax.data.local_builder import LocalBuilder
from perpo_jax.data.shapes_grounding import grounding_question
from perpo_jax.data.shapes_scene import format_box


@dataclasses.dataclass
class LocalFilesConfig(tfds.core.BuilderConfig):
    """annotations: the data file; image_root: directory image paths are relative to."""

    annotations: str = ""
    image_root: str = ""
    skip_invalid: bool = False


def _image_bytes(path: str) -> bytes:
    """RGB files are stored byte-for-byte; other modes (grey, CMYK, RGBA) as RGB PNG."""
    with Image.open(path) as im:
        if im.mode == "RGB":
            with open(path, "rb") as f:
                return f.read()
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()


def _skipped_metadata(skipped) -> tfds.core.MetadataDict:
    meta = tfds.core.MetadataDict()
    meta["skipped"] = [dataclasses.asdict(s) for s in skipped]
    return meta


class RefcocoStyle(LocalBuilder):
    """RefCOCO-style referring expressions; pass `config=LocalFilesConfig(...)`."""

    VERSION = tfds.core.Version("1.0.0")

    def _read(self):
        cfg = self.builder_config
        return refcoco_style.read_refcoco_jsonl(cfg.annotations, cfg.image_root,
                                                skip_invalid=cfg.skip_invalid)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Referring expressions with normalised boxes.",
            metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image_path": tfds.features.Text(),
                "question": tfds.features.Text(),
                "sentence": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            }))

    def _split_generators(self, dl_manager):
        records, skipped = self._read()
        self.skipped = skipped
        self.info.metadata.update(_skipped_metadata(skipped))
        splits = sorted({r.split for r in records})
        return {s: self._generate_examples([r for r in records if r.split == s]) for s in splits}

    def _generate_examples(self, records):
        for r in records:
            yield r.line, {"image": _image_bytes(r.image_path), "image_path": r.image_path,
                           "question": grounding_question(r.sentence), "sentence": r.sentence,
                           "answer": format_box(r.box), "box": r.box}


class PerpoLists(LocalBuilder):
    """Official PerPO pre-sampled candidate lists; pass `config=LocalFilesConfig(...)`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Pre-sampled candidate lists with their IoU scores.",
            metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image_path": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "candidates": tfds.features.Sequence(tfds.features.Text()),
                "scores": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            }))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        records, skipped = refcoco_style.read_official_lists(
            cfg.annotations, cfg.image_root, skip_invalid=cfg.skip_invalid)
        self.skipped = skipped
        self.info.metadata.update(_skipped_metadata(skipped))
        return {"train": self._generate_examples(records)}

    def _generate_examples(self, records):
        # Keyed by entry index, not line: a JSON array written on one line has one line.
        for index, r in enumerate(records):
            yield index, {"image": _image_bytes(r.image_path), "image_path": r.image_path,
                          "question": r.question, "answer": r.answer,
                          "candidates": list(r.candidates), "scores": r.scores}


def _build(cls, data_dir: str, name: str, annotations: str, image_root: str, skip_invalid: bool):
    config = LocalFilesConfig(name=name, annotations=annotations, image_root=image_root,
                              skip_invalid=skip_invalid)
    builder = cls(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    skipped = [refcoco_style.Skipped(**s) for s in builder.info.metadata.get("skipped", [])]
    return builder, skipped


def build_refcoco_style(data_dir: str, annotations: str, image_root: str, *, name: str = "default",
                        skip_invalid: bool = False):
    """Prepare (or reuse) `refcoco_style/<name>` -> (builder, list[Skipped])."""
    return _build(RefcocoStyle, data_dir, name, annotations, image_root, skip_invalid)


def build_official_lists(data_dir: str, path: str, image_root: str, *, name: str = "default",
                         skip_invalid: bool = False):
    """Prepare (or reuse) `perpo_lists/<name>` -> (builder, list[Skipped])."""
    return _build(PerpoLists, data_dir, name, path, image_root, skip_invalid)
