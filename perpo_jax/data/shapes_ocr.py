"""TFDS builder `shapes_ocr`: short random text lines rendered on noisy backgrounds.

Each S x S image shows 1–`max_lines` lines (default 3) of 1–`max_words` random
lowercase/digit "words" (default 2) of 2–6 characters at `font_size` pixels (proportional, or
in monospace cells `pitch` pixels wide; anywhere, or at the left as a word crop), rendered by
`perpo_jax.data.ocr_text` (dark ink on a light noisy background; the ink lies inside
`text_box`).

Features:
    image     uint8 [S, S, 3]
    question  bytes "What is the text in the image?"
    answer    bytes the lines joined with "\\n"
    text_box  float32 [4] normalised [x1, y1, x2, y2] of the rendered text block
    index     int32

Deterministic: example i of split s comes from `np.random.default_rng([seed, s, i])`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from perpo_jax.data.local_builder import SCENE_SPLITS, SceneBuilder, SceneConfig, prepared
from perpo_jax.data.ocr_text import MAX_LINES, MAX_WORDS, check_text, render_text

OCR_QUESTION = "What is the text in the image?"


@dataclasses.dataclass
class ShapesOcrConfig(SceneConfig):
    """`SceneConfig` (S = 96 by default) + font_size in pixels; at most max_lines lines of
    max_words words; pitch: 0 = proportional text, > 0 = monospace cells of this many
    pixels; placement: random | left (see ocr_text.render_text)."""

    image_size: int = 96
    font_size: int = 12
    max_lines: int = MAX_LINES
    max_words: int = MAX_WORDS
    pitch: int = 0
    placement: str = "random"


def make_example(cfg: ShapesOcrConfig, split: str, index: int) -> dict:
    """The feature dict of example `index` of `split`."""
    rng = np.random.default_rng([cfg.seed, SCENE_SPLITS[split], index])
    image, lines, (x0, y0, x1, y1) = render_text(rng, cfg.image_size, cfg.font_size,
                                                 cfg.max_lines, cfg.max_words, cfg.pitch,
                                                 cfg.placement)
    box = np.array([x0, y0, x1, y1], np.float32) / np.float32(cfg.image_size)
    return {"image": image, "question": OCR_QUESTION, "answer": "\n".join(lines),
            "text_box": box, "index": np.int32(index)}


class ShapesOcr(SceneBuilder):
    """Synthetic OCR; pass `config=ShapesOcrConfig(name=..., ...)`."""

    BUILDER_CONFIGS = [ShapesOcrConfig(name="default")]
    DESCRIPTION = "Random short text lines on noisy backgrounds."

    def _features(self) -> dict:
        return {
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "text_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "index": tfds.features.Scalar(dtype=np.int32),
        }

    def _generate_examples(self, split: str, count: int):
        for i in range(count):
            yield i, make_example(self.builder_config, split, i)


def build(data_dir: str, *, num_train: int = 2000, num_val: int = 200, image_size: int = 96,
          font_size: int = 12, seed: int = 0, max_lines: int = MAX_LINES,
          max_words: int = MAX_WORDS, pitch: int = 0, placement: str = "random") -> ShapesOcr:
    """Prepare (or reuse) the dataset under `data_dir` and return its builder. The config
    name encodes every setting (the line / word limits, pitch and placement only when not
    the defaults, so datasets made before they existed keep their names)."""
    check_text(font_size, max_lines, max_words, pitch, placement)
    name = f"n{num_train}_v{num_val}_s{image_size}_f{font_size}_seed{seed}"
    if (max_lines, max_words) != (MAX_LINES, MAX_WORDS):
        name += f"_l{max_lines}w{max_words}"
    if pitch:
        name += f"_pitch{pitch}"
    if placement != "random":
        name += f"_{placement}"
    config = ShapesOcrConfig(name=name, num_train=num_train, num_val=num_val,
                             image_size=image_size, font_size=font_size, seed=seed,
                             max_lines=max_lines, max_words=max_words, pitch=pitch,
                             placement=placement)
    return prepared(ShapesOcr, data_dir, config)
