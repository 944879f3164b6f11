"""POPE (Li et al. 2023, RUCAIBox/POPE): object-hallucination yes/no questions.

    questions = read_pope_questions("coco_pope_random.json")   # JSONL lines
    examples = pope_examples(questions, "/data/coco/val2014")   # data.examples.Example list

A question file is JSONL, one {"question_id", "image", "text", "label"} per line ("Is there
a {object} in the image?", label "yes" / "no"); the official files hold 3,000 questions over
500 COCO val2014 images per split (random / popular / adversarial). The prompt is the text
plus LLaVA-1.5's short-answer suffix (`POPE_SUFFIX`). This module only reads and builds:
a model answers the questions in `perpo_jax.eval.pope` (`evaluate_pope`, `run_pope`), and
the reward of `data.task=pope` is `perpo_jax.rewards.pope`.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from perpo_jax.data.examples import Example
from perpo_jax.data.refcoco_style import DataFileError

POPE_SUFFIX = "Answer the question using a single word or phrase."
POPE_SPLITS = ("random", "popular", "adversarial")
_KEYS = ("question_id", "image", "text", "label")


def pope_question(text: str) -> str:
    """The prompt of one POPE question: its text, a newline, `POPE_SUFFIX` (LLaVA-1.5 eval)."""
    return f"{text.strip()}\n{POPE_SUFFIX}"


def read_pope_questions(path: str) -> list[dict]:
    """The questions of one POPE JSONL file; a malformed line (bad JSON, not UTF-8, keys or
    label missing) is a DataFileError naming file:line."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFileError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataFileError(f"{path}:{n}: not a JSON line: {e}") from None
        missing = [k for k in _KEYS if k not in row] if isinstance(row, dict) else list(_KEYS)
        if missing:
            raise DataFileError(f"{path}:{n}: POPE question lacks {missing} (needs "
                                f"{list(_KEYS)})")
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise DataFileError(f"{path}:{n}: label {row['label']!r} is not yes / no")
        out.append({**row, "label": label})
    if not out:
        raise DataFileError(f"{path}: no POPE questions")
    return out


def pope_examples(questions: Sequence[dict], image_dir: str) -> list[Example]:
    """`Example`s (image HWC uint8, prompt with `POPE_SUFFIX`, answer = label) of the
    questions, images read from `image_dir` (each file decoded once)."""
    cache: dict[str, np.ndarray] = {}
    out = []
    for q in questions:
        name = q["image"]
        if name not in cache:
            path = os.path.join(image_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"POPE question {q['question_id']}: image {path} not found")
            try:
                with Image.open(path) as im:
                    cache[name] = np.asarray(im.convert("RGB"))
            except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
                raise DataFileError(f"POPE question {q['question_id']}: image {path} cannot "
                                    f"be read (decoding it failed): {e}") from None
        out.append(Example(image=cache[name], question=pope_question(q["text"]),
                           answer=q["label"]))
    return out


def pope_files(pope_dir: str, splits: Sequence[str] = POPE_SPLITS) -> dict[str, str]:
    """{split: path} of the official question files (`coco_pope_<split>.json`) in a dir."""
    out = {s: os.path.join(pope_dir, f"coco_pope_{s}.json") for s in splits}
    missing = [p for p in out.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"POPE question file(s) not found: {missing}")
    return out
