"""Readers for local grounding data: official PerPO candidate lists and RefCOCO-style files.

(a) Official PerPO lists (`read_official_lists`): a JSON array (the official repository's
    format, see `tests/data/perpo_official_example.json`) or JSONL, one object per list:
        {"image_id": any, "image_path": "COCO/train2014/x.jpg", "question": str,
         "answer": "[x1, y1, x2, y2]", "answers_gen": [str] * N, "iou_scores": [float] * N}
    `image_path` is relative to `image_root`. Every "</s>" is removed from `question`, as the
    official reader does (`train_perpo_lora.py`: `data["question"].replace('</s>', "")`);
    `answer` and `iou_scores` are kept exactly as given (never recomputed).

(b) RefCOCO-style annotations (`read_refcoco_jsonl`): JSONL, one referring expression per line:
        {"image": "train2014/COCO_train2014_000000580344.jpg",   # relative to image_root
         "bbox": [x, y, w, h],          # pixels, COCO convention (top-left corner + size)
         "sentence": "glass behind burger",
         "split": "train"}              # any split name: train / val / testA / ...
    Optional keys are kept in `extra` (e.g. "ref_id", "ann_id"). Boxes are normalised by the
    image's own size ("original" frame): [x/W, y/H, (x+w)/W, (y+h)/H]; a box may stick out of
    the image by at most 1 pixel (COCO rounding) and is then clipped to [0, 1]. The TFDS
    builders convert to the configured frame (`rewards.boxes.box_to_frame`) in one place.
    `perpo_jax.data.refer` reads the refer-toolkit layout into the same records.

A malformed entry, a line that is not UTF-8, or a missing or undecodable image (truncated,
corrupt, or larger than PIL's decompression-bomb limit: every image is fully decoded here,
once, so training never meets it) raises `DataFileError` naming the file and line number.
With `skip_invalid=True` the entry is skipped instead, logged with a warning, and returned in
the list of `Skipped` records — never silently. A JSON array whose syntax or encoding is
broken cannot be resynchronised and always raises.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class DataFileError(ValueError):
    """A data file entry is malformed or names a missing image."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An entry left out under skip_invalid=True."""

    path: str
    line: int
    reason: str


@dataclasses.dataclass(frozen=True)
class OfficialList:
    """One pre-sampled candidate list. scores [N] float32 (IoU of each candidate)."""

    image_id: Any
    image_path: str  # absolute
    question: str
    answer: str
    candidates: tuple[str, ...]
    scores: np.ndarray
    line: int


@dataclasses.dataclass(frozen=True)
class RefExpression:
    """One referring expression; box [4] float32 normalised [x1, y1, x2, y2]."""

    image_path: str  # absolute
    image_size: tuple[int, int]  # (width, height) in pixels
    bbox_xywh: tuple[float, float, float, float]  # pixels, as in the file
    box: np.ndarray
    sentence: str
    split: str
    line: int
    extra: dict


# ----------------------------------------------------------------------------- parsing


def _json_entries(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, parsed object or None, syntax error or None) for each entry.

    A file whose first non-blank character is '[' is one JSON array (entries numbered by the
    line they start on); otherwise JSONL (blank lines ignored). A JSONL line that is not
    UTF-8 is one bad entry; in a JSON array it is an error for the whole file.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.lstrip().startswith(b"["):
        for number, raw in enumerate(data.splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, None, _not_utf8(e.object[e.start], e.start + 1)
                continue
            if line.strip():
                try:
                    yield number, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield number, None, f"invalid JSON: {e.msg} (column {e.colno})"
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise DataFileError(f"{path}:{line}: {_not_utf8(data[e.start], column)}; a JSON array "
                            "cannot be skipped over, fix the file") from None
    stripped = text.lstrip()
    decoder = json.JSONDecoder()
    pos = len(text) - len(stripped) + 1  # just after '['

    def skip_blank(i):
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    pos = skip_blank(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{e.lineno}: invalid JSON array ({e.msg}); a broken "
                                "array cannot be skipped over, fix the file") from None
        yield line, obj, None
        pos = skip_blank(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_blank(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DataFileError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' "
                            "in the JSON array")


def _not_utf8(byte: int, column: int) -> str:
    return f"not UTF-8 text (byte 0x{byte:02x} at column {column})"


def _read_entries(path: str, parse: Callable[[dict], Any], skip_invalid: bool):
    """Apply `parse` to each entry; errors name path:line, or are collected when skipping."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    records, skipped = [], []
    for line, obj, syntax_error in _json_entries(path):
        try:
            if syntax_error:
                raise DataFileError(syntax_error)
            if not isinstance(obj, dict):
                raise DataFileError(f"expected a JSON object, got {type(obj).__name__}")
            records.append(parse(obj, line))
        except DataFileError as e:
            if not skip_invalid:
                raise DataFileError(f"{path}:{line}: {e}") from None
            log.warning("skipping %s:%d: %s", path, line, e)
            skipped.append(Skipped(path, line, str(e)))
    return records, skipped


def _field(obj: dict, key: str, kind: type | tuple[type, ...]):
    if key not in obj:
        raise DataFileError(f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataFileError(f"key {key!r} has type {type(value).__name__}")
    return value


def _image_file(image_root: str, relative: str) -> str:
    full = os.path.join(image_root, relative)
    if not os.path.isfile(full):
        raise DataFileError(f"image {full} not found")
    return os.path.abspath(full)


def _image_size(path: str, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(width, height) of an image file, fully decoded once (`sizes` caches it): a truncated
    or corrupt file, or one whose header claims more pixels than PIL's decompression-bomb
    limit (`Image.MAX_IMAGE_PIXELS`), is a DataFileError here rather than a crash in
    training, where the stored bytes would first be decoded."""
    if path not in sizes:
        try:
            with Image.open(path) as im:
                im.load()
                sizes[path] = im.size
        except Image.DecompressionBombError as e:
            raise DataFileError(f"image {path} is refused: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "damaged"
            raise DataFileError(f"image {path} cannot be read (decoding it failed): {e}") from None
    return sizes[path]


def _split_name(value: str) -> str:
    """A split name TFDS accepts (letters, digits, '_'), e.g. train / val / testA."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", value):
        raise DataFileError(f"split {value!r} is not a valid split name (letters, digits, '_')")
    return value


# ----------------------------------------------------------------------------- readers


def read_official_lists(path: str, image_root: str, *, skip_invalid: bool = False):
    """Official PerPO lists -> (list[OfficialList], list[Skipped]). See module docstring."""
    sizes: dict[str, tuple[int, int]] = {}  # each image decoded once

    def parse(obj: dict, line: int) -> OfficialList:
        candidates = _field(obj, "answers_gen", list)
        scores = _field(obj, "iou_scores", list)
        if not candidates:
            raise DataFileError("'answers_gen' is empty")
        if len(candidates) != len(scores):
            raise DataFileError(f"'answers_gen' has {len(candidates)} items but 'iou_scores' "
                                f"has {len(scores)}")
        if not all(isinstance(c, str) for c in candidates):
            raise DataFileError("'answers_gen' must hold strings")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                   for s in scores):
            raise DataFileError("'iou_scores' must hold finite numbers")
        image = _image_file(image_root, _field(obj, "image_path", str))
        _image_size(image, sizes)
        return OfficialList(
            image_id=obj.get("image_id"),
            image_path=image,
            question=_field(obj, "question", str).replace("</s>", ""),
            answer=_field(obj, "answer", str),
            candidates=tuple(candidates), scores=np.asarray(scores, np.float32), line=line)

    return _read_entries(path, parse, skip_invalid)


def _normalised_box(bbox, width: int, height: int) -> np.ndarray:
    """[x, y, w, h] pixels -> [4] float32 [x1, y1, x2, y2] / image size, checked."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbox)):
        raise DataFileError(f"'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise DataFileError(f"'bbox' {bbox} has no area")
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        raise DataFileError(f"'bbox' {bbox} lies outside the {width}x{height} image")
    box = np.array([x / width, y / height, (x + w) / width, (y + h) / height], np.float64)
    return np.clip(box, 0.0, 1.0).astype(np.float32)


def read_refcoco_jsonl(path: str, image_root: str, *, skip_invalid: bool = False):
    """RefCOCO-style JSONL -> (list[RefExpression], list[Skipped]). See module docstring."""
    sizes: dict[str, tuple[int, int]] = {}  # images are shared by many expressions

    def parse(obj: dict, line: int) -> RefExpression:
        image = _image_file(image_root, _field(obj, "image", str))
        width, height = _image_size(image, sizes)
        sentence = _field(obj, "sentence", str).strip()
        if not sentence:
            raise DataFileError("'sentence' is empty")
        bbox = _field(obj, "bbox", list)
        box = _normalised_box(bbox, width, height)
        extra = {k: v for k, v in obj.items() if k not in ("image", "bbox", "sentence", "split")}
        return RefExpression(image_path=image, image_size=(width, height),
                             bbox_xywh=tuple(float(v) for v in bbox), box=box,
                             sentence=sentence, split=_split_name(_field(obj, "split", str)),
                             line=line,
                             extra=extra)

    return _read_entries(path, parse, skip_invalid)
