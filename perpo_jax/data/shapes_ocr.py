"""TFDS builder `shapes_ocr`: short random text lines rendered on noisy backgrounds.

Each S x S image shows 1–3 lines of 1–2 random lowercase/digit "words" (2–6 characters),
drawn in a dark colour with PIL's built-in font (`ImageFont.load_default(size)`, nothing
downloaded; no anti-aliasing) on a light, noisy, tinted background. Background channels stay
>= 150 and ink channels <= 70, so ink pixels are exactly those with every channel below
`INK_THRESHOLD`, and they all lie inside `text_box`.

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
import string

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from perpo_jax.data.local_builder import LocalBuilder

OCR_QUESTION = "What is the text in the image?"
ALPHABET = string.ascii_lowercase + string.digits
_SPLIT_CODES = {"train": 0, "val": 1}
INK_THRESHOLD = 110  # every channel of an ink pixel is below this, of a background pixel above


def _random_text(rng: np.random.Generator) -> list[str]:
    """1–3 lines of 1–2 words of 2–6 characters from ALPHABET."""
    lines = []
    for _ in range(int(rng.integers(1, 4))):
        words = ["".join(rng.choice(list(ALPHABET), size=int(rng.integers(2, 7))))
                 for _ in range(int(rng.integers(1, 3)))]
        lines.append(" ".join(words))
    return lines


def render_text(rng: np.random.Generator, image_size: int, font_size: int):
    """(image, lines, box_px): box_px = (x0, y0, x1, y1), exclusive end, tight around the ink.

    The text is first rasterised (no anti-aliasing) into a 0/1 mask, so the box and the ink
    pixels agree exactly; text is re-drawn until it fits with a 3-pixel margin.
    """
    font = ImageFont.load_default(size=font_size)
    spacing = max(1, font_size // 4)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    for _ in range(100):
        lines = _random_text(rng)
        text = "\n".join(lines)
        left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font,
                                                            spacing=spacing)
        width, height = right - left, bottom - top
        if width + 6 <= image_size and height + 6 <= image_size:
            break
    else:
        raise ValueError(f"image_size={image_size} cannot hold text at font_size={font_size}")
    x = int(rng.integers(3, image_size - width - 2)) - left
    y = int(rng.integers(3, image_size - height - 2)) - top
    mask_image = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask_image)
    draw.fontmode = "1"  # no anti-aliasing: every pixel is either ink or background
    draw.multiline_text((x, y), text, fill=255, font=font, spacing=spacing)
    mask = np.asarray(mask_image) > 0  # [S, S]
    ys, xs = np.nonzero(mask)
    tint = rng.integers(185, 236, size=3)
    noise = rng.integers(-35, 20, size=(image_size, image_size, 3))
    pixels = np.clip(tint + noise, 150, 255).astype(np.uint8)
    pixels[mask] = rng.integers(0, 71, size=3).astype(np.uint8)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Image.fromarray(pixels, mode="RGB"), lines, box


@dataclasses.dataclass
class ShapesOcrConfig(tfds.core.BuilderConfig):
    """num_train / num_val examples; image_size S; font_size in pixels; data seed."""

    num_train: int = 2000
    num_val: int = 200
    image_size: int = 96
    font_size: int = 12
    seed: int = 0


def make_example(cfg: ShapesOcrConfig, split: str, index: int) -> dict:
    """The feature dict of example `index` of `split`."""
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
    image, lines, (x0, y0, x1, y1) = render_text(rng, cfg.image_size, cfg.font_size)
    box = np.array([x0, y0, x1, y1], np.float32) / np.float32(cfg.image_size)
    return {"image": image, "question": OCR_QUESTION, "answer": "\n".join(lines),
            "text_box": box, "index": np.int32(index)}


class ShapesOcr(LocalBuilder):
    """Synthetic OCR; pass `config=ShapesOcrConfig(name=..., ...)`."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ShapesOcrConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self, description="Random short text lines on noisy backgrounds.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "text_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "index": tfds.features.Scalar(dtype=np.int32),
            }))

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "val": cfg.num_val}
        # TFDS rejects empty splits: a split asked to hold 0 examples is left out.
        return {s: self._generate_examples(s, n) for s, n in counts.items() if n > 0}

    def _generate_examples(self, split: str, count: int):
        for i in range(count):
            yield i, make_example(self.builder_config, split, i)


def build(data_dir: str, *, num_train: int = 2000, num_val: int = 200, image_size: int = 96,
          font_size: int = 12, seed: int = 0) -> ShapesOcr:
    """Prepare (or reuse) the dataset under `data_dir` and return its builder."""
    name = f"n{num_train}_v{num_val}_s{image_size}_f{font_size}_seed{seed}"
    config = ShapesOcrConfig(name=name, num_train=num_train, num_val=num_val,
                             image_size=image_size, font_size=font_size, seed=seed)
    builder = ShapesOcr(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return builder
