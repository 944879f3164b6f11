"""The bases of this package's TFDS builders (they generate or read local files only).

- `LocalBuilder`: a GeneratorBasedBuilder that downloads nothing.
- `SceneBuilder`: generated S x S scenes (`shapes_grounding`, `shapes_ocr`, `shapes_pope`):
  one `_info` (a PNG image + the subclass's `_features()`) and one `_split_generators` over the
  "train" / "val" counts of a `SceneConfig`; `SCENE_SPLITS` gives each split its seed code.
- `FileBuilder`: examples read from local annotation files (`refcoco_builders`, `page_ocr`,
  `hf_preference`): the subclass says how to `_read` records and turn one into an `_example`;
  one split per record split, examples keyed by their index in it, skipped entries kept in
  the dataset's metadata (`info.metadata["skipped"]`), so a reused dataset still tells them.
- `prepared` / `prepared_files`: a builder whose dataset is built once, then reused.

Importing this module also quiets what TFDS says about such builders and nothing else: its
"Downloading and preparing dataset Unknown size ..." / "... Subsequent calls will reuse this
data." lines (meaningless without downloads; `prepare_data` says itself whether it built or
reused a dataset, and why), absl's "Using custom data configuration" warning (every config
here is custom by design) and the OpenCV notice (PIL decodes these images). Every other
warning stays; `prepare_data` turns TFDS' split-generation bars off while it builds.
"""
from __future__ import annotations

import dataclasses
import io
import logging

import tensorflow_datasets as tfds
from PIL import Image

from perpo_jax.data.refcoco_style import Skipped

_QUIETED = ("Using custom data configuration", "OpenCV is not installed")
# the split code in each generated example's seed, [seed, code, index]
SCENE_SPLITS = {"train": 0, "val": 1}


class _QuietTfdsNotices(logging.Filter):
    """Drops absl log records whose message starts with one of `_QUIETED`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIETED)


def _quiet_tfds_notices() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietTfdsNotices) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietTfdsNotices())


_quiet_tfds_notices()


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that downloads nothing.

    TFDS looks for a download-checksums file next to a builder's source through
    `importlib_resources` (a backport that is not a dependency here and not needed on
    Python >= 3.9); these builders have no URLs, so there is no code path to search.
    """

    code_path = None

    def _log_download_bytes(self) -> None:
        """TFDS prints download/generated sizes here ("Unknown size" for local builders)."""

    def _log_download_done(self) -> None:
        """TFDS prints "downloaded and prepared ... Subsequent calls will reuse" here."""


def prepared(cls, data_dir: str, config: tfds.core.BuilderConfig):
    """A `cls` builder of `config` under `data_dir` (array_record), its dataset built unless
    it is there already."""
    builder = cls(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder


# ----------------------------------------------------------------------------- generated scenes


@dataclasses.dataclass
class SceneConfig(tfds.core.BuilderConfig):
    """num_train / num_val: examples (shapes_pope: images) per split; image_size: S in
    pixels; seed: data seed."""

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 64
    seed: int = 0


class SceneBuilder(LocalBuilder, skip_registration=True):
    """Generated scenes: image uint8 [S, S, 3] (PNG) + `_features()`; pass a `SceneConfig`.

    `SPLITS` maps each output split to (the scene split its examples come from, extra
    arguments of `_generate_examples(scene_split, count, *extra)`); a split whose scene
    split is asked to hold 0 examples is left out (TFDS rejects empty splits).
    """

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""
    SPLITS: dict[str, tuple] = {"train": ("train",), "val": ("val",)}

    def _features(self) -> dict:
        """The features besides "image" (name -> tfds feature), in their order."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        image = tfds.features.Image(shape=(size, size, 3), encoding_format="png")
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({"image": image, **self._features()}))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "val": cfg.num_val}
        return {name: self._generate_examples(scene, counts[scene], *extra)
                for name, (scene, *extra) in self.SPLITS.items() if counts[scene] > 0}


# ----------------------------------------------------------------------------- local files


@dataclasses.dataclass
class LocalFilesConfig(tfds.core.BuilderConfig):
    """annotations: the data file; image_root: directory image paths are relative to."""

    annotations: str = ""
    image_root: str = ""
    skip_invalid: bool = False


def image_file_bytes(path: str) -> bytes:
    """RGB files are stored byte-for-byte; other modes (grey, CMYK, RGBA) as RGB PNG."""
    with Image.open(path) as im:
        if im.mode == "RGB":
            with open(path, "rb") as f:
                return f.read()
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()


class FileBuilder(LocalBuilder, skip_registration=True):
    """Examples read from local files; pass a `LocalFilesConfig` (or a subclass).

    Subclasses give `_features()`, `_read()` -> (records, skipped: list of
    `refcoco_style.Skipped`) and `_example(record)` -> one feature dict; `_splits` groups
    the records by their `split` (override it to stream them into one split).
    """

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""

    def _features(self) -> dict:
        """name -> tfds feature, in their order."""
        raise NotImplementedError

    def _read(self):
        """-> (records, skipped). A streaming reader may fill `skipped` as it is consumed."""
        raise NotImplementedError

    def _example(self, record) -> dict:
        raise NotImplementedError

    def _splits(self, records) -> dict:
        """{split: its records}, splits in name order."""
        names = sorted({r.split for r in records})
        return {s: [r for r in records if r.split == s] for s in names}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict(self._features()))

    def _split_generators(self, dl_manager):
        records, self.skipped = self._read()
        self._keep_skipped()
        return {s: self._generate_examples(rs) for s, rs in self._splits(records).items()}

    def _generate_examples(self, records):
        # Keyed by index within the split, not by line: a refer entry gives one example per
        # sentence, and a JSON array written on one line has a single line.
        for index, record in enumerate(records):
            yield index, self._example(record)
        # a streaming reader's `skipped` is complete only now; TFDS writes the dataset's
        # metadata after the examples
        self._keep_skipped()

    def _keep_skipped(self) -> None:
        self.info.metadata.update({"skipped": [dataclasses.asdict(s) for s in self.skipped]})


def prepared_files(cls, data_dir: str, config: LocalFilesConfig):
    """`prepared` for a `FileBuilder` -> (builder, list[Skipped]); the skipped entries come
    from the dataset's metadata, so a reused dataset reports them too."""
    builder = prepared(cls, data_dir, config)
    return builder, [Skipped(**s) for s in builder.info.metadata.get("skipped", [])]
