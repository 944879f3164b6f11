"""Random text lines rendered on noisy backgrounds: the pixels of the `shapes_ocr` task.

Pure numpy + PIL; no TFDS here (the builder lives in `shapes_ocr.py`). Text is drawn in a dark
colour with PIL's built-in font (`ImageFont.load_default(size)`, nothing downloaded; no
anti-aliasing) on a light, noisy, tinted background. Background channels stay >= 150 and ink
channels <= 70, so ink pixels are exactly those with every channel below `INK_THRESHOLD`.
"""
from __future__ import annotations

import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perpo_jax.config import OCR_MAX_LINES as MAX_LINES
from perpo_jax.config import OCR_MAX_WORDS as MAX_WORDS
from perpo_jax.config import OCR_PLACEMENTS as PLACEMENTS
from perpo_jax.config import check_ocr_text as check_text

ALPHABET = string.ascii_lowercase + string.digits
INK_THRESHOLD = 110  # every channel of an ink pixel is below this, of a background pixel above
# MAX_LINES / MAX_WORDS (the defaults), PLACEMENTS and check_text are config.py's: it checks
# data.ocr_* when a config loads, and imports nothing of the project


def random_text(rng: np.random.Generator, max_lines: int = MAX_LINES,
                max_words: int = MAX_WORDS) -> list[str]:
    """1–max_lines lines of 1–max_words words of 2–6 characters from ALPHABET."""
    lines = []
    for _ in range(int(rng.integers(1, max_lines + 1))):
        words = ["".join(rng.choice(list(ALPHABET), size=int(rng.integers(2, 7))))
                 for _ in range(int(rng.integers(1, max_words + 1)))]
        lines.append(" ".join(words))
    return lines


def draw_cells(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str], font,
               spacing: int, pitch: int) -> None:
    """Monospace layout: character k of a line centred in the k-th `pitch`-pixel cell from x,
    lines (ascent + descent + spacing) apart, the first line's top at y."""
    ascent, descent = font.getmetrics()
    for row, line in enumerate(lines):
        baseline = xy[1] + ascent + row * (ascent + descent + spacing)
        for k, char in enumerate(line):
            if char != " ":
                draw.text((xy[0] + k * pitch + pitch / 2, baseline), char, fill=255, font=font,
                          anchor="ms")


def _cells_bbox(lines: list[str], font, spacing: int, pitch: int) -> tuple[int, int, int, int]:
    """Ink box (left, top, right, bottom; exclusive ends) of `draw_cells` at the origin."""
    ascent, descent = font.getmetrics()
    pad = 2 * (ascent + descent)  # glyphs may overhang their cell / line
    width = pitch * max(len(line) for line in lines) + 2 * pad
    height = len(lines) * (ascent + descent + spacing) + 2 * pad
    scratch = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(scratch)
    draw.fontmode = "1"
    draw_cells(draw, (pad, pad), lines, font, spacing, pitch)
    ys, xs = np.nonzero(np.asarray(scratch))
    return int(xs.min()) - pad, int(ys.min()) - pad, int(xs.max()) + 1 - pad, int(ys.max()) + 1 - pad


def render_text(rng: np.random.Generator, image_size: int, font_size: int,
                max_lines: int = MAX_LINES, max_words: int = MAX_WORDS, pitch: int = 0,
                placement: str = "random"):
    """(image, lines, box_px): box_px = (x0, y0, x1, y1), exclusive end, tight around the ink.

    pitch: 0 = the font's own (proportional) spacing; > 0 = a monospace layout, each
    character centred in a cell `pitch` pixels wide (`draw_cells`). placement: random = the
    text block anywhere with a 3-pixel margin; left = its ink starts 4 pixels from the left
    edge, vertically centred (a word crop, as a text detector hands it to a recogniser; see
    PLACEMENTS). The text is first rasterised (no anti-aliasing) into a 0/1 mask, so the box
    and the ink pixels agree exactly; text is re-drawn until it fits with a 3-pixel margin.
    """
    font = ImageFont.load_default(size=font_size)
    spacing = max(1, font_size // 4)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    for _ in range(100):
        lines = random_text(rng, max_lines, max_words)
        text = "\n".join(lines)
        if pitch:
            left, top, right, bottom = _cells_bbox(lines, font, spacing, pitch)
        else:
            left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font,
                                                                spacing=spacing)
        width, height = right - left, bottom - top
        if width + 6 <= image_size and height + 6 <= image_size:
            break
    else:
        raise ValueError(f"image_size={image_size} cannot hold text at font_size={font_size}")
    if placement == "left":
        x, y = 4 - left, (image_size - height) // 2 - top
    else:
        x = int(rng.integers(3, image_size - width - 2)) - left
        y = int(rng.integers(3, image_size - height - 2)) - top
    mask_image = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask_image)
    draw.fontmode = "1"  # no anti-aliasing: every pixel is either ink or background
    if pitch:
        draw_cells(draw, (x, y), lines, font, spacing, pitch)
    else:
        draw.multiline_text((x, y), text, fill=255, font=font, spacing=spacing)
    mask = np.asarray(mask_image) > 0  # [S, S]
    ys, xs = np.nonzero(mask)
    tint = rng.integers(185, 236, size=3)
    noise = rng.integers(-35, 20, size=(image_size, image_size, 3))
    pixels = np.clip(tint + noise, 150, 255).astype(np.uint8)
    pixels[mask] = rng.integers(0, 71, size=3).astype(np.uint8)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Image.fromarray(pixels, mode="RGB"), lines, box
