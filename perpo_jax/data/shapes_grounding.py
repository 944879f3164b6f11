"""TFDS builder `shapes_grounding`: synthetic referring-expression grounding (array_record).

Each example: an S x S RGB image with 2–5 coloured shapes (config `min_objects`–`max_objects`),
a referring expression picking exactly one of them (spatial relations allowed unless
`relations=False`), the official PerPO grounding prompt and the answer box text.

Features (as read back by `as_data_source()`):
    image          uint8 [S, S, 3]
    question       bytes  "Please provide the bounding box coordinate of the region this
                          sentence describes: <expression>"
    expression     bytes
    answer         bytes  "[x1, y1, x2, y2]" (2 decimals)
    box            float32 [4]   exact normalised box of the target, [0, 1]
    object_boxes   float32 [n, 4] normalised boxes of all n objects (drawing order)
    object_shape   int32 [n]  index into `shapes_scene.SHAPES`
    object_colour  int32 [n]  index into `shapes_scene.COLOUR_NAMES`
    object_size    int32 [n]  index into `shapes_scene.SIZES`
    target         int32      index of the referred object in the object_* arrays
    index          int32      example number within its split

Deterministic: example i of split s is generated from `np.random.default_rng([seed, s, i])`,
so the content depends only on (seed, split, i), never on generation order.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from perpo_jax.data import shapes_scene
from perpo_jax.data.local_builder import SCENE_SPLITS, SceneBuilder, SceneConfig, prepared

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "


def grounding_question(expression: str) -> str:
    """The official PerPO grounding prompt for one referring expression."""
    return GROUNDING_PROMPT + expression


@dataclasses.dataclass
class ShapesGroundingConfig(SceneConfig):
    """`SceneConfig` + min_objects / max_objects: objects per scene; relations:
    spatial-relation expressions allowed (attribute expressions only when False); sides: box
    side ranges as fractions of S (`shapes_scene.SIDES`)."""

    min_objects: int = shapes_scene.MIN_OBJECTS
    max_objects: int = shapes_scene.MAX_OBJECTS
    relations: bool = True
    sides: tuple = shapes_scene.SIDES


def make_example(seed: int, split: str, index: int, image_size: int, *,
                 min_objects: int = shapes_scene.MIN_OBJECTS,
                 max_objects: int = shapes_scene.MAX_OBJECTS, relations: bool = True,
                 sides=shapes_scene.SIDES) -> dict:
    """The feature dict of example `index` of `split` (see module docstring)."""
    rng = np.random.default_rng([seed, SCENE_SPLITS[split], index])
    objects, target, expression, image = shapes_scene.sample_example(
        rng, image_size, min_objects=min_objects, max_objects=max_objects, relations=relations,
        sides=sides)
    box = objects[target].normalised_box(image_size)
    return {
        "image": image,
        "question": grounding_question(expression),
        "expression": expression,
        "answer": shapes_scene.format_box(box),
        "box": box,
        "object_boxes": np.stack([o.normalised_box(image_size) for o in objects]),
        "object_shape": np.array([shapes_scene.SHAPES.index(o.shape) for o in objects], np.int32),
        "object_colour": np.array([shapes_scene.COLOUR_NAMES.index(o.colour) for o in objects],
                                  np.int32),
        "object_size": np.array([shapes_scene.SIZES.index(o.size) for o in objects], np.int32),
        "target": np.int32(target),
        "index": np.int32(index),
    }


class ShapesGrounding(SceneBuilder):
    """Synthetic shapes grounding; pass `config=ShapesGroundingConfig(name=..., ...)`."""

    BUILDER_CONFIGS = [ShapesGroundingConfig(name="default")]
    DESCRIPTION = "Coloured shapes with referring expressions and target boxes."

    def _features(self) -> dict:
        return {
            "question": tfds.features.Text(),
            "expression": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "object_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "object_shape": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "object_colour": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "object_size": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "target": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int32),
        }

    def _generate_examples(self, split: str, count: int):
        cfg = self.builder_config
        for i in range(count):
            yield i, make_example(cfg.seed, split, i, cfg.image_size,
                                  min_objects=cfg.min_objects, max_objects=cfg.max_objects,
                                  relations=cfg.relations, sides=cfg.sides)


def config_name(*, num_train: int, num_val: int, image_size: int, seed: int, min_objects: int,
                max_objects: int, relations: bool, sides=shapes_scene.SIDES) -> str:
    """The TFDS config name: every setting, the scene knobs only when not the defaults (so
    datasets made before those knobs existed keep their names)."""
    name = f"n{num_train}_v{num_val}_s{image_size}_seed{seed}"
    if (min_objects, max_objects) != (shapes_scene.MIN_OBJECTS, shapes_scene.MAX_OBJECTS):
        name += f"_obj{min_objects}-{max_objects}"
    if not relations:
        name += "_norel"
    if tuple(sides) != shapes_scene.SIDES:
        name += "_sides" + "-".join(f"{x:g}" for x in sides)
    return name


def build(data_dir: str, *, num_train: int = 2000, num_val: int = 200, image_size: int = 64,
          seed: int = 0, min_objects: int = shapes_scene.MIN_OBJECTS,
          max_objects: int = shapes_scene.MAX_OBJECTS, relations: bool = True,
          sides=shapes_scene.SIDES) -> ShapesGrounding:
    """Prepare (or reuse) the dataset under `data_dir` and return its builder.

    The config name encodes every parameter, so different settings never share files.
    Read it with `builder.as_data_source()["train"]`.
    """
    shapes_scene.check_object_counts(min_objects, max_objects)
    sides = shapes_scene.check_sides(sides)
    name = config_name(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                       min_objects=min_objects, max_objects=max_objects, relations=relations,
                       sides=sides)
    config = ShapesGroundingConfig(name=name, num_train=num_train, num_val=num_val,
                                   image_size=image_size, seed=seed, min_objects=min_objects,
                                   max_objects=max_objects, relations=relations, sides=sides)
    return prepared(ShapesGrounding, data_dir, config)
