"""Synthetic scenes of coloured shapes and referring expressions that pick exactly one of them.

Pure numpy + PIL; no TFDS here (the builder lives in `shapes_grounding.py`).

Geometry (all in pixels of an S x S image):
- an object's box is `(x0, y0, x1, y1)`, INCLUSIVE pixel indices; the shape is drawn so that
  its painted pixels touch all four sides of that box (PIL rasterises rectangles, ellipses and
  polygons exactly on their bounding box);
- its normalised box is `[x0/S, y0/S, (x1+1)/S, (y1+1)/S]` (pixel edges), in [0, 1].

Layout rules, which make the labels checkable from pixels:
- the only overlaps are a small object lying inside a large one's box shrunk by `INSET`
  pixels, with a different colour; large objects are drawn first, so every object's
  painted pixels on its own box border stay visible;
- any other two objects keep at least `GAP` background pixels between their boxes.

Spatial relations are strict: "A left of B" means A's box ends before B's begins
(`A.x1 < B.x0`); likewise "right of", "above" (`A.y1 < B.y0`) and "below".
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
from PIL import Image, ImageDraw

# SIDES and check_sides are config.py's: it checks data.shape_sides when a config loads, and
# imports nothing of the project
from perpo_jax.config import SHAPE_SIDES as SIDES
from perpo_jax.config import check_shape_sides as check_sides

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 125, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")

GAP = 3  # background pixels kept between non-overlapping boxes
INSET = 2  # a small object inside a large one keeps this far from the large box's border
MIN_OBJECTS, MAX_OBJECTS = 2, 5


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One painted object. `box_px` = (x0, y0, x1, y1), inclusive pixel indices."""

    shape: str
    colour: str
    size: str
    box_px: tuple[int, int, int, int]

    def normalised_box(self, image_size: int) -> np.ndarray:
        """[4] float32 box [x1, y1, x2, y2] in [0, 1] (pixel edges / image size)."""
        x0, y0, x1, y1 = self.box_px
        return np.array([x0, y0, x1 + 1, y1 + 1], np.float32) / np.float32(image_size)


# ----------------------------------------------------------------------------- layout


def _side_range(size: str, image_size: int, sides=SIDES) -> tuple[int, int]:
    """Inclusive range of box side lengths (pixels) for a size class."""
    lo, hi = sides[:2] if size == "small" else sides[2:]
    return max(4, round(lo * image_size)), max(5, round(hi * image_size))


def _boxes_apart(a, b, gap: int) -> bool:
    """True when boxes a, b (inclusive px) have at least `gap` pixels between them."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _inside(inner, outer, inset: int) -> bool:
    return (inner[0] >= outer[0] + inset and inner[1] >= outer[1] + inset
            and inner[2] <= outer[2] - inset and inner[3] <= outer[3] - inset)


def _compatible(new: ShapeObject, old: ShapeObject) -> bool:
    """The layout rules of the module docstring, for one pair."""
    if _boxes_apart(new.box_px, old.box_px, GAP):
        return True
    if new.colour == old.colour or new.size == old.size:
        return False
    small, large = (new, old) if new.size == "small" else (old, new)
    return _inside(small.box_px, large.box_px, INSET)


def _propose(rng: np.random.Generator, image_size: int, placed: list[ShapeObject],
             sides=SIDES) -> ShapeObject:
    """A random object; a small one is put inside an existing large one ~35% of the time."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    size = SIZES[rng.integers(len(SIZES))]
    lo, hi = _side_range(size, image_size, sides)
    side = int(rng.integers(lo, hi + 1))
    hosts = [o for o in placed if o.size == "large"]
    if size == "small" and hosts and rng.random() < 0.35:
        host = hosts[rng.integers(len(hosts))].box_px
        span_x = (host[0] + INSET, host[2] - INSET - side + 1)
        span_y = (host[1] + INSET, host[3] - INSET - side + 1)
    else:
        span_x = span_y = (0, image_size - side)
    if span_x[1] < span_x[0] or span_y[1] < span_y[0]:
        span_x = span_y = (0, image_size - side)
    x0 = int(rng.integers(span_x[0], span_x[1] + 1))
    y0 = int(rng.integers(span_y[0], span_y[1] + 1))
    return ShapeObject(shape, colour, size, (x0, y0, x0 + side - 1, y0 + side - 1))


def check_object_counts(min_objects: int, max_objects: int) -> None:
    """1 <= min_objects <= max_objects, else a ValueError naming both."""
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got min_objects={min_objects}, "
                         f"max_objects={max_objects}")


def sample_layout(rng: np.random.Generator, image_size: int, *, min_objects: int = MIN_OBJECTS,
                  max_objects: int = MAX_OBJECTS, sides=SIDES) -> list[ShapeObject]:
    """min_objects–max_objects (default 2–5) objects obeying the layout rules, in drawing
    order (large first); box sides drawn from `sides` (see SIDES)."""
    check_object_counts(min_objects, max_objects)
    want = int(rng.integers(min_objects, max_objects + 1))
    placed: list[ShapeObject] = []
    for _ in range(200 * want):
        if len(placed) == want:
            break
        candidate = _propose(rng, image_size, placed, sides)
        if all(_compatible(candidate, old) for old in placed):
            placed.append(candidate)
    if len(placed) < min_objects:
        raise ValueError(f"image_size={image_size} is too small to place {min_objects} shapes")
    return sorted(placed, key=lambda o: o.size != "large")  # stable: large ones first


# ----------------------------------------------------------------------------- drawing


def render_scene(objects: list[ShapeObject], image_size: int,
                 rng: np.random.Generator) -> Image.Image:
    """RGB image [S, S]: noisy grey background (r = g = b, never a shape colour), then shapes."""
    level = int(rng.integers(200, 241))
    noise = rng.integers(-12, 13, size=(image_size, image_size, 1))
    grey = np.clip(level + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(grey, 3, axis=2), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj.box_px
        fill = COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:  # triangle, apex up
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


# ----------------------------------------------------------------------------- language

# A descriptor is (size, colour, shape), each None when not mentioned; colour or shape is set.
Descriptor = tuple[str | None, str | None, str | None]


def describe(desc: Descriptor) -> str:
    """('small', 'red', None) -> 'the small red shape'."""
    size, colour, shape = desc
    words = [w for w in (size, colour) if w] + [shape or "shape"]
    return "the " + " ".join(words)


def matches(desc: Descriptor, obj: ShapeObject) -> bool:
    size, colour, shape = desc
    return ((size is None or obj.size == size) and (colour is None or obj.colour == colour)
            and (shape is None or obj.shape == shape))


def holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Strict box relation 'a <relation> b' (see module docstring)."""
    ax0, ay0, ax1, ay1 = a.box_px
    bx0, by0, bx1, by1 = b.box_px
    return {"left of": ax1 < bx0, "right of": ax0 > bx1,
            "above": ay1 < by0, "below": ay0 > by1}[relation]


def descriptors_of(obj: ShapeObject) -> list[Descriptor]:
    """Every descriptor true of `obj` that names its colour or its shape."""
    out = []
    for use_size, use_colour, use_shape in itertools.product((False, True), repeat=3):
        if use_colour or use_shape:
            out.append((obj.size if use_size else None, obj.colour if use_colour else None,
                        obj.shape if use_shape else None))
    return out


_PHRASE = r"the (?:(small|large) )?(?:(" + "|".join(COLOUR_NAMES) + r") )?(" + "|".join(
    SHAPES + ("shape",)) + r")"
_EXPRESSION = re.compile(rf"^{_PHRASE}(?: ({'|'.join(RELATIONS)}) {_PHRASE})?$")


def referred_objects(expression: str, objects: list[ShapeObject]) -> list[int]:
    """Indices of the objects an expression (as made by `referring_expression`) refers to."""
    m = _EXPRESSION.match(expression)
    if m is None:
        raise ValueError(f"not a shapes referring expression: {expression!r}")
    size, colour, shape, relation, b_size, b_colour, b_shape = m.groups()
    desc = (size, colour, None if shape == "shape" else shape)
    picked = [i for i, o in enumerate(objects) if matches(desc, o)]
    if relation is None:
        return picked
    anchor_desc = (b_size, b_colour, None if b_shape == "shape" else b_shape)
    anchors = [j for j, o in enumerate(objects) if matches(anchor_desc, o)]
    if len(anchors) != 1:  # an anchor must itself be unique
        return []
    j = anchors[0]
    return [i for i in picked if i != j and holds(relation, objects[i], objects[j])]


def _attribute_expressions(objects, t) -> list[str]:
    return [describe(d) for d in descriptors_of(objects[t])
            if sum(matches(d, o) for o in objects) == 1]


def _relation_expressions(objects, t) -> tuple[list[str], list[str]]:
    """(expressions whose head phrase alone is ambiguous, the others)."""
    needed, optional = [], []
    for b, anchor in enumerate(objects):
        if b == t:
            continue
        anchor_descs = [d for d in descriptors_of(anchor)
                        if sum(matches(d, o) for o in objects) == 1]
        for relation in RELATIONS:
            if not holds(relation, objects[t], anchor):
                continue
            for d in descriptors_of(objects[t]):
                hits = [i for i, o in enumerate(objects)
                        if i != b and matches(d, o) and holds(relation, o, anchor)]
                if hits != [t]:
                    continue
                ambiguous = sum(matches(d, o) for o in objects) > 1
                for ad in anchor_descs:
                    text = f"{describe(d)} {relation} {describe(ad)}"
                    (needed if ambiguous else optional).append(text)
    return needed, optional


def referring_expression(objects: list[ShapeObject], target: int,
                         rng: np.random.Generator, *, relations: bool = True) -> str | None:
    """A random expression that picks exactly `objects[target]`, or None if none exists.

    Relations are used half of the time when available, preferring ones whose head phrase
    alone would be ambiguous; `relations=False` allows attribute expressions only. The
    result is checked with `referred_objects`.
    """
    attribute = _attribute_expressions(objects, target)
    needed, optional = _relation_expressions(objects, target) if relations else ([], [])
    relation = needed or optional
    pool = relation if relation and (not attribute or rng.random() < 0.5) else attribute
    if not pool:
        return None
    expression = pool[rng.integers(len(pool))]
    if referred_objects(expression, objects) != [target]:
        raise AssertionError(f"generated ambiguous expression {expression!r}")
    return expression


def format_box(box) -> str:
    """[4] floats -> '[0.12, 0.34, 0.56, 0.78]' (2 decimals, the official answer format)."""
    return "[" + ", ".join(f"{float(v):.2f}" for v in box) + "]"


def sample_example(rng: np.random.Generator, image_size: int, *, min_objects: int = MIN_OBJECTS,
                   max_objects: int = MAX_OBJECTS, relations: bool = True, sides=SIDES):
    """(objects, target index, expression, image) for one example; retries unlucky layouts.

    min_objects / max_objects: objects per scene (default 2–5); relations: whether spatial
    relations ("the red circle left of the blue square") may be used; sides: box side ranges
    (see SIDES).
    """
    for _ in range(100):
        objects = sample_layout(rng, image_size, min_objects=min_objects, max_objects=max_objects,
                                sides=sides)
        target = int(rng.integers(len(objects)))
        expression = referring_expression(objects, target, rng, relations=relations)
        if expression is not None:
            return objects, target, expression, render_scene(objects, image_size, rng)
    raise RuntimeError("could not generate a referable scene in 100 tries")
