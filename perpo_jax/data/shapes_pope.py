"""TFDS builder `shapes_pope`: POPE-style yes/no object questions over the shapes scenes.

An "object" is a colour + shape category ("red circle"; 6 × 3 = 18 categories). Per image
(a `shapes_scene` layout of `min_objects`–`max_objects` shapes) n = min(3, present
categories) questions are asked about present categories ("yes") and n about absent ones
("no"): 50 % yes. The absent ones are chosen as POPE chooses them:

- random:      uniformly among the absent categories;
- popular:     the absent categories most frequent over the split's images;
- adversarial: the absent categories that co-occur most often (over the split's images)
               with the categories present in this image.

Ties are broken by category order. Question: "Is there a <colour> <shape> in the image?" +
"\\n" + `pope.POPE_SUFFIX`; answer "yes" / "no".

Splits: "train" (train images, random negatives: what `data.task=pope` trains on), "val"
(val images, random negatives), "popular" and "adversarial" (the same val images). The
`num_train` / `num_val` settings count IMAGES; a split holds up to 6 questions per image.
Shapes scenes draw every category uniformly, so "popular" and "adversarial" differ from
"random" only by the sampling noise of the split's counts (unlike COCO's skewed objects).

Features: image uint8 [S, S, 3], question, answer ("yes"/"no"), category (text),
image_index int32, index int32.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from perpo_jax.data import shapes_scene
from perpo_jax.data.local_builder import SCENE_SPLITS, SceneBuilder, SceneConfig, prepared
from perpo_jax.data.pope import pope_question

CATEGORIES = tuple(f"{c} {s}" for c in shapes_scene.COLOUR_NAMES for s in shapes_scene.SHAPES)
STRATEGIES = ("random", "popular", "adversarial")
QUESTIONS_PER_SIDE = 3


def object_question(category: str) -> str:
    return pope_question(f"Is there a {category} in the image?")


def _layout(seed: int, split: str, index: int, image_size: int, min_objects: int,
            max_objects: int):
    """(objects, rng after the layout) of image `index` of `split`: deterministic."""
    rng = np.random.default_rng([seed, SCENE_SPLITS[split], index])
    objects = shapes_scene.sample_layout(rng, image_size, min_objects=min_objects,
                                         max_objects=max_objects)
    return objects, rng


def present_categories(objects) -> list[int]:
    """Sorted category indices present among `objects`."""
    return sorted({CATEGORIES.index(f"{o.colour} {o.shape}") for o in objects})


def split_statistics(present: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(frequency [C] images holding each category, co-occurrence [C, C] images holding
    both) over the images of a split."""
    c = len(CATEGORIES)
    freq, co = np.zeros(c, np.int64), np.zeros((c, c), np.int64)
    for cats in present:
        freq[cats] += 1
        co[np.ix_(cats, cats)] += 1
    np.fill_diagonal(co, 0)
    return freq, co


def _ranked(scores: np.ndarray, absent: list[int], n: int) -> list[int]:
    """The n absent categories of highest score, ties by category order."""
    return sorted(absent, key=lambda k: (-scores[k], k))[:n]


def image_questions(present: list[int], strategy: str, rng: np.random.Generator,
                    freq: np.ndarray, co: np.ndarray) -> list[tuple[str, str]]:
    """[(category, "yes"/"no")] for one image: n present, n absent by `strategy`."""
    n = min(QUESTIONS_PER_SIDE, len(present))
    yes = [present[i] for i in sorted(rng.choice(len(present), n, replace=False))]
    absent = [k for k in range(len(CATEGORIES)) if k not in present]
    if strategy == "random":
        no = [absent[i] for i in sorted(rng.choice(len(absent), n, replace=False))]
    elif strategy == "popular":
        no = _ranked(freq, absent, n)
    elif strategy == "adversarial":
        no = _ranked(co[present].sum(axis=0), absent, n)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return [(CATEGORIES[k], "yes") for k in yes] + [(CATEGORIES[k], "no") for k in no]


@dataclasses.dataclass
class ShapesPopeConfig(SceneConfig):
    """`SceneConfig` (counting images) + min_objects / max_objects per scene."""

    num_train: int = 500
    num_val: int = 100
    min_objects: int = 1
    max_objects: int = 3


class ShapesPope(SceneBuilder):
    """Synthetic POPE; pass `config=ShapesPopeConfig(name=..., ...)`."""

    BUILDER_CONFIGS = [ShapesPopeConfig(name="default")]
    DESCRIPTION = "POPE-style yes/no object questions over coloured-shape scenes."
    # train: random negatives; the val images three times, once per negative strategy
    SPLITS = {"train": ("train", "random"), "val": ("val", "random"),
              "popular": ("val", "popular"), "adversarial": ("val", "adversarial")}

    def _features(self) -> dict:
        return {
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "category": tfds.features.Text(),
            "image_index": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int32),
        }

    def _generate_examples(self, split: str, count: int, strategy: str):
        cfg = self.builder_config
        geometry = (cfg.image_size, cfg.min_objects, cfg.max_objects)
        present = [present_categories(_layout(cfg.seed, split, i, *geometry)[0])
                   for i in range(count)]
        freq, co = split_statistics(present)
        n = 0
        for i in range(count):
            objects, rng = _layout(cfg.seed, split, i, *geometry)
            image = shapes_scene.render_scene(objects, cfg.image_size, rng)
            q_rng = np.random.default_rng([cfg.seed, SCENE_SPLITS[split], i,
                                           STRATEGIES.index(strategy)])
            for category, label in image_questions(present[i], strategy, q_rng, freq, co):
                yield n, {"image": image, "question": object_question(category), "answer": label,
                          "category": category, "image_index": np.int32(i), "index": np.int32(n)}
                n += 1


def build(data_dir: str, *, num_train: int = 500, num_val: int = 100, image_size: int = 64,
          seed: int = 0, min_objects: int = 1, max_objects: int = 3) -> ShapesPope:
    """Prepare (or reuse) the dataset under `data_dir`; its config name encodes every setting."""
    shapes_scene.check_object_counts(min_objects, max_objects)
    name = f"n{num_train}_v{num_val}_s{image_size}_seed{seed}_obj{min_objects}-{max_objects}"
    config = ShapesPopeConfig(name=name, num_train=num_train, num_val=num_val,
                              image_size=image_size, seed=seed, min_objects=min_objects,
                              max_objects=max_objects)
    return prepared(ShapesPope, data_dir, config)


def pope_splits(builder) -> dict:
    """{"random": val, "popular": ..., "adversarial": ...} random-access sources."""
    sources = builder.as_data_source()
    return {"random": sources["val"], "popular": sources["popular"],
            "adversarial": sources["adversarial"]}
