"""Evaluation outputs: JSON reports (written atomically) and box-drawing PNGs.

- `write_report(path, metrics)`: nested dicts of numbers / strings (numpy allowed) as JSON.
- `draw_boxes_png(path, images, gt_boxes, pred_boxes_by_method, captions)`: a grid of images
  with the ground-truth box in black and each method's predicted box in its own colour.
"""
from __future__ import annotations

import json
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perpo_jax.atomic import atomic_file


def _plain(value):
    """numpy scalars/arrays -> JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file next to `path`, then rename it onto `path`."""
    with atomic_file(path) as tmp:
        write(tmp)


def write_report(path: str, metrics: Mapping) -> None:
    """Write `metrics` (nested dicts of numbers/strings, numpy allowed) as indented JSON."""
    text = json.dumps(_plain(metrics), indent=2, sort_keys=True, allow_nan=True) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


# Box colours no shapes-scene object has (red, green, blue, yellow, purple, orange on light grey)
GT_COLOUR = (0, 0, 0)
METHOD_COLOURS = ((0, 200, 230), (255, 0, 220), (120, 70, 20), (0, 120, 110), (120, 120, 255))
# Each box is a band centred on its edge, this many pixels wide per box drawn after it: the
# ground truth widest, each later box narrower on top, so where boxes agree all colours show
BOX_BAND = 3


CAPTION_LINES, LINE_HEIGHT = 2, 14


def _wrap(caption: str, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    """Greedy word wrap to `width` pixels, at most CAPTION_LINES lines ("…" if cut)."""
    lines, current = [], ""
    for word in caption.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    lines.append(current)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] += " …"
    return "\n".join(lines)


def _tile(image, gt_box, preds, caption: str, tile: int, font) -> Image.Image:
    """One grid cell: the image scaled to tile x tile, boxes drawn (ground truth widest,
    each later one `BOX_BAND` px narrower on top), "<method>: no box" for a prediction with
    no readable box, caption below. preds: [(box [4], colour, method name)]."""
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB").resize(
        (tile, tile), Image.NEAREST)
    cell = Image.new("RGB", (tile, tile + CAPTION_LINES * LINE_HEIGHT + 4), (255, 255, 255))
    cell.paste(img, (0, 0))
    draw = ImageDraw.Draw(cell)
    boxes = [(gt_box, GT_COLOUR, None)] + list(preds)
    unread = []
    for k, (box, colour, name) in enumerate(boxes):
        box = np.asarray(box, np.float64)
        if not np.isfinite(box).all():
            unread.append((name, colour))  # no readable prediction for this image
            continue
        x1, y1, x2, y2 = np.clip(box, 0, 1) * tile
        width = BOX_BAND * (len(boxes) - k)
        pad = width // 2  # the band is centred on the box edge: it hides less of the object
        draw.rectangle([x1 - pad, y1 - pad, max(x2 - 1, x1) + pad, max(y2 - 1, y1) + pad],
                       outline=colour, width=width)
    for row, (name, colour) in enumerate(unread):
        text = f"{name}: no box"
        y = 2 + row * (LINE_HEIGHT + 2)
        draw.rectangle([1, y - 1, 6 + draw.textlength(text, font=font), y + LINE_HEIGHT],
                       fill=(255, 255, 255), outline=colour, width=2)
        draw.text((4, y), text, fill=(0, 0, 0), font=font)
    draw.multiline_text((2, tile + 2), _wrap(caption, tile - 4, draw, font), fill=(0, 0, 0),
                        font=font, spacing=2)
    return cell


def draw_boxes_png(path: str, images: Sequence, gt_boxes: np.ndarray,
                   pred_boxes_by_method: Mapping[str, np.ndarray], captions: Sequence[str],
                   tile: int = 192, columns: int = 4) -> None:
    """Grid PNG: each image with its GT box (black) and every method's box (own colour, none
    of them a shapes-scene colour), in bands that stay visible where boxes agree.

    images: N HWC uint8 arrays/PIL images; gt_boxes [N, 4]; pred_boxes_by_method:
    name -> [N, 4] normalised (NaN rows = nothing predicted: the tile says "<name>: no box");
    captions [N]. A legend line on top maps colours to "ground truth" and the method names.
    """
    if len(pred_boxes_by_method) > len(METHOD_COLOURS):
        raise ValueError(f"at most {len(METHOD_COLOURS)} methods can be drawn")
    n = len(images)
    colours = dict(zip(pred_boxes_by_method, METHOD_COLOURS))
    font = ImageFont.load_default(size=12)
    rows, cols = -(-n // columns), min(columns, n)
    legend_h, cell_h = 20, tile + CAPTION_LINES * LINE_HEIGHT + 4
    canvas = Image.new("RGB", (cols * tile + (cols - 1) * 4, legend_h + rows * (cell_h + 4)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 2
    for name, colour in [("ground truth", GT_COLOUR)] + list(colours.items()):
        draw.rectangle([x, 4, x + 10, 14], fill=colour)
        draw.text((x + 14, 3), name, fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(name, font=font))
    for i in range(n):
        preds = [(np.asarray(boxes)[i], colours[m], m) for m, boxes in pred_boxes_by_method.items()]
        cell = _tile(images[i], gt_boxes[i], preds, captions[i], tile, font)
        canvas.paste(cell, ((i % columns) * (tile + 4), legend_h + (i // columns) * (cell_h + 4)))
    _atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
