"""Reader and TFDS builder for local page-OCR annotations (dense OCR: one page, its full text).

Two layouts (`fmt`):

(a) "jsonl" — one page per line:
        {"image": "pages/p001.png",            # relative to image_root, or absolute
         "text": "the page's full text",       # ground truth, kept exactly (newlines too)
         "question": "...",                    # optional, default PAGE_OCR_QUESTION
         "split": "train"}                     # optional, default `default_split`
    image_root defaults to the JSONL file's own directory. Other keys are ignored.

(b) "fox" — the page-OCR ground truth of the Fox benchmark (ucaslcl/Fox, "Focus Anywhere";
    files `en_page_ocr.json` / `cn_page_ocr.json` of `focus_benchmark_test.zip`, images in
    `en_pdf_png/` / `cn_pdf_png/`). One JSON array, one object per page, in the LLaVA
    conversation layout that Fox's README example and GOT-OCR2.0's `GOT/eval/eval_GOT_ocr.py`
    read (`ann["image"]`, `ann["conversations"][0]["value"]` = prompt,
    `ann["conversations"][1]["value"]` = ground truth):
        [{"image": "en_1.png",                                  # relative to image_root
          "conversations": [{"from": "human", "value": "<image>\\n<the page-OCR prompt>"},
                            {"from": "gpt",   "value": "<the page's text>"}]},
         ...]
    The question is the human turn with every "<image>" removed and surrounding whitespace
    stripped (the processor's template puts the image token back); the answer is the gpt
    turn exactly. Every page goes to split `default_split`. A JSONL file of the same objects
    is read too (the layout is per entry).

Errors: a malformed entry, a missing or unreadable image raises `DataFileError` naming
file:line (JSON arrays: the line the entry starts on) and what is wrong. With
`skip_invalid=True` the entry is skipped, logged, and returned among the `Skipped` records —
never silently (the same rules and types as `refcoco_style`).

TFDS features (the `shapes_ocr` layout's text features, plus where the image came from):
    image       uint8 [H, W, 3] (page size as in the file)
    image_path  bytes, absolute
    question    bytes
    answer      bytes, the ground-truth text
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from perpo_jax.data.local_builder import (FileBuilder, LocalFilesConfig, image_file_bytes,
                                          prepared_files)
from perpo_jax.data.refcoco_style import (DataFileError, _field, _image_file, _image_size,
                                          _read_entries, _split_name)
from perpo_jax.data.shapes_ocr import OCR_QUESTION

FORMATS = ("jsonl", "fox")
PAGE_OCR_QUESTION = OCR_QUESTION
IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class OcrPage:
    """One page: image file (absolute), question, ground-truth text, split, source line."""

    image_path: str
    question: str
    text: str
    split: str
    line: int


# ----------------------------------------------------------------------------- parsing


def _text(obj: dict, key: str) -> str:
    """A string field that must hold some non-whitespace text (kept exactly as given)."""
    value = _field(obj, key, str)
    if not value.strip():
        raise DataFileError(f"{key!r} is empty")
    return value


def _checked_image(image_root: str, relative: str, sizes: dict) -> str:
    """Absolute path of an existing image whose header PIL can read."""
    path = _image_file(image_root, relative)
    _image_size(path, sizes)
    return path


def _jsonl_page(obj: dict, line: int, image_root: str, default_split: str,
                sizes: dict) -> OcrPage:
    question = obj.get("question", PAGE_OCR_QUESTION)
    if not isinstance(question, str) or not question.strip():
        raise DataFileError("'question' must be a non-empty string when given")
    split = _split_name(_field(obj, "split", str)) if "split" in obj else default_split
    return OcrPage(image_path=_checked_image(image_root, _field(obj, "image", str), sizes),
                   question=question.strip(), text=_text(obj, "text"), split=split, line=line)


def _fox_turn(turns: list, index: int, speaker: str) -> str:
    turn = turns[index]
    if not isinstance(turn, dict):
        raise DataFileError(f"'conversations'[{index}] must be an object")
    if turn.get("from") != speaker:
        raise DataFileError(f"'conversations'[{index}]['from'] must be {speaker!r}, got "
                            f"{turn.get('from')!r}")
    value = turn.get("value")
    if not isinstance(value, str):
        raise DataFileError(f"'conversations'[{index}]['value'] must be a string")
    return value


def _fox_page(obj: dict, line: int, image_root: str, default_split: str,
              sizes: dict) -> OcrPage:
    turns = _field(obj, "conversations", list)
    if len(turns) < 2:
        raise DataFileError(f"'conversations' needs a human and a gpt turn, has {len(turns)}")
    question = _fox_turn(turns, 0, "human").replace(IMAGE_TOKEN, "").strip()
    if not question:
        raise DataFileError("the human turn holds no question besides the image token")
    text = _fox_turn(turns, 1, "gpt")
    if not text.strip():
        raise DataFileError("the gpt turn (ground truth) is empty")
    return OcrPage(image_path=_checked_image(image_root, _field(obj, "image", str), sizes),
                   question=question, text=text, split=default_split, line=line)


_PARSERS = {"jsonl": _jsonl_page, "fox": _fox_page}


def read_page_ocr(path: str, image_root: str | None = None, *, fmt: str = "jsonl",
                  skip_invalid: bool = False, default_split: str = "train"):
    """Page-OCR annotations -> (list[OcrPage], list[Skipped]). See the module docstring.

    image_root: directory relative image paths start from; None = the annotation file's dir.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    default_split = _split_name(default_split)
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    sizes: dict[str, tuple[int, int]] = {}  # header check once per image file
    parse = _PARSERS[fmt]
    return _read_entries(path, lambda obj, line: parse(obj, line, root, default_split, sizes),
                         skip_invalid)


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass
class PageOcrConfig(LocalFilesConfig):
    """fmt: "jsonl" | "fox"; image_root "" = the annotation file's directory."""

    fmt: str = "jsonl"


class PageOcr(FileBuilder):
    """Local page-OCR annotations; pass `config=PageOcrConfig(...)`. One split per split name."""

    DESCRIPTION = "Page images with their full ground-truth text."

    def _features(self) -> dict:
        return {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "image_path": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
        }

    def _read(self):
        cfg = self.builder_config
        pages, skipped = read_page_ocr(cfg.annotations, cfg.image_root or None, fmt=cfg.fmt,
                                       skip_invalid=cfg.skip_invalid)
        if not pages:
            raise DataFileError(f"{cfg.annotations}: no valid page to build a dataset from "
                                f"({len(skipped)} skipped)")
        return pages, skipped

    def _example(self, page: OcrPage) -> dict:
        return {"image": image_file_bytes(page.image_path), "image_path": page.image_path,
                "question": page.question, "answer": page.text}


def build_page_ocr(data_dir: str, path: str, image_root: str | None = None, *,
                   fmt: str = "jsonl", name: str = "default", skip_invalid: bool = False):
    """Prepare (or reuse) `page_ocr/<name>_<fmt>` -> (builder, list[Skipped])."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    config = PageOcrConfig(name=f"{name}_{fmt}", annotations=path, image_root=image_root or "",
                           skip_invalid=skip_invalid, fmt=fmt)
    return prepared_files(PageOcr, data_dir, config)
