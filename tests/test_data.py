"""Data: TFDS builders (no TensorFlow), pixel-checked labels, unique referring expressions,
local-file readers and the sharded resumable loader."""
import glob
import json
import re
import sys

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image, ImageDraw, ImageFont

from perpo_jax.data import (ocr_text, refcoco_builders, refcoco_style, shapes_grounding,
                            shapes_ocr, shapes_scene)
from perpo_jax.data.loader import ShardedLoader

SIZE = 64


@pytest.fixture(scope="module")
def grounding(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    kwargs = dict(num_train=24, num_val=6, image_size=SIZE)
    return {"a": shapes_grounding.build(str(root / "a"), seed=7, **kwargs),
            "b": shapes_grounding.build(str(root / "b"), seed=7, **kwargs),
            "c": shapes_grounding.build(str(root / "c"), seed=8, **kwargs)}


def _raw_records(builder, split):
    files = sorted(glob.glob(f"{builder.data_dir}/*{split}.array_record*"))
    assert files, f"no array_record files for {split} in {builder.data_dir}"
    return [r for f in files for r in array_record_module.ArrayRecordReader(f).read_all()]


def test_grounding_deterministic_schema_and_no_tensorflow(grounding):
    sources = {k: b.as_data_source() for k, b in grounding.items()}
    assert len(sources["a"]["train"]) == 24 and len(sources["a"]["val"]) == 6
    for split in ("train", "val"):
        assert _raw_records(grounding["a"], split) == _raw_records(grounding["b"], split)
        assert _raw_records(grounding["a"], split) != _raw_records(grounding["c"], split)
    x = sources["a"]["train"][0]
    assert x["image"].shape == (SIZE, SIZE, 3) and x["image"].dtype == np.uint8
    assert x["box"].shape == (4,) and x["box"].dtype == np.float32
    n = x["object_boxes"].shape[0]
    assert 2 <= n <= 5 and x["object_boxes"].shape == (n, 4)
    for key in ("object_shape", "object_colour", "object_size"):
        assert x[key].shape == (n,) and x[key].dtype == np.int32
    assert {"question", "expression", "answer", "target", "index"} <= set(x)
    assert "tensorflow" not in sys.modules


def _all_examples(builder):
    data = builder.as_data_source()
    return [data[split][i] for split in ("train", "val") for i in range(len(data[split]))]


def test_every_object_is_drawn_exactly_in_its_box(grounding):
    """For EVERY object: its colour touches all four sides of its labelled box, and no pixel
    of that colour lies in the 2-pixel ring just outside the box."""
    for x in _all_examples(grounding["a"]):
        image = x["image"].astype(int)
        for box, colour in zip(x["object_boxes"], x["object_colour"]):
            rgb = shapes_scene.COLOURS[shapes_scene.COLOUR_NAMES[colour]]
            hit = (image == np.array(rgb)).all(-1)  # [S, S]
            x0, y0, x2, y2 = np.rint(box * SIZE).astype(int)  # pixel edges
            inside = hit[y0:y2, x0:x2]
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            ring = hit[max(y0 - 2, 0):y2 + 2, max(x0 - 2, 0):x2 + 2].sum()
            assert ring == inside.sum(), f"colour {rgb} outside box {box} in example {x['index']}"
        np.testing.assert_array_equal(x["box"], x["object_boxes"][x["target"]])


_RELATIONS = {  # on normalised boxes [x1, y1, x2, y2]; strict = no shared pixel column/row
    "left of": lambda a, b: a[2] <= b[0], "right of": lambda a, b: a[0] >= b[2],
    "above": lambda a, b: a[3] <= b[1], "below": lambda a, b: a[1] >= b[3]}


def _phrase_matches(phrase, x):
    """Objects matching 'the [size] [colour] shape-word' (an independent parser)."""
    words = phrase.split()
    assert words[0] == "the", phrase
    keep = np.ones(len(x["object_shape"]), bool)
    for w in words[1:]:
        if w in shapes_scene.SIZES:
            keep &= x["object_size"] == shapes_scene.SIZES.index(w)
        elif w in shapes_scene.COLOURS:
            keep &= x["object_colour"] == shapes_scene.COLOUR_NAMES.index(w)
        elif w in shapes_scene.SHAPES:
            keep &= x["object_shape"] == shapes_scene.SHAPES.index(w)
        else:
            assert w == "shape", phrase
    return set(np.nonzero(keep)[0].tolist())


def test_every_expression_picks_exactly_its_target(grounding):
    used_relation = False
    for x in _all_examples(grounding["a"]) + _all_examples(grounding["c"]):
        expr = x["expression"].decode()
        assert x["question"].decode() == (
            "Please provide the bounding box coordinate of the region this sentence describes: "
            + expr)
        relation = next((r for r in _RELATIONS if f" {r} the " in expr), None)
        if relation is None:
            picked = _phrase_matches(expr, x)
        else:
            used_relation = True
            head, anchor = expr.split(f" {relation} ")
            anchors = _phrase_matches(anchor, x)
            assert len(anchors) == 1, expr
            (b,) = anchors
            boxes = x["object_boxes"]
            picked = {i for i in _phrase_matches(head, x)
                      if i != b and _RELATIONS[relation](boxes[i], boxes[b])}
        assert picked == {int(x["target"])}, (expr, x["index"])
        numbers = [float(v) for v in re.fullmatch(
            r"\[(\d\.\d\d), (\d\.\d\d), (\d\.\d\d), (\d\.\d\d)\]", x["answer"].decode()).groups()]
        np.testing.assert_allclose(numbers, x["box"], atol=0.005 + 1e-6)
    assert used_relation


def test_scene_generator_rejects_ambiguity():
    """referred_objects is the generator's own check: it must see an ambiguous phrase."""
    red = shapes_scene.ShapeObject("circle", "red", "small", (0, 0, 9, 9))
    red2 = shapes_scene.ShapeObject("circle", "red", "small", (30, 0, 39, 9))
    blue = shapes_scene.ShapeObject("square", "blue", "large", (12, 20, 28, 38))
    objs = [red, red2, blue]
    assert shapes_scene.referred_objects("the red circle", objs) == [0, 1]
    assert shapes_scene.referred_objects("the red circle left of the blue square", objs) == [0]
    assert shapes_scene.referred_objects("the red circle right of the blue square", objs) == [1]
    assert shapes_scene.referred_objects("the shape above the blue square", objs) == [0, 1]
    expression = shapes_scene.referring_expression(objs, 0, np.random.default_rng(0))
    assert shapes_scene.referred_objects(expression, objs) == [0]


def test_scene_knobs_object_count_and_relations(tmp_path):
    """min_objects / max_objects bound every scene; relations=False never uses a relation;
    the settings enter the TFDS config name; defaults keep the original name and content."""
    relation_words = tuple(shapes_scene.RELATIONS)
    for i in range(40):
        x = shapes_grounding.make_example(3, "train", i, SIZE, min_objects=1, max_objects=2,
                                          relations=False)
        assert 1 <= x["object_boxes"].shape[0] <= 2
        assert not any(f" {r} " in x["expression"] for r in relation_words)
        assert shapes_scene.referred_objects(x["expression"], _scene_objects(x)) == [x["target"]]
    default = shapes_grounding.make_example(3, "train", 0, SIZE)
    explicit = shapes_grounding.make_example(3, "train", 0, SIZE, min_objects=2, max_objects=5,
                                             relations=True)
    assert default["answer"] == explicit["answer"] and default["expression"] == explicit["expression"]
    b = shapes_grounding.build(str(tmp_path), num_train=8, num_val=2, image_size=SIZE,
                               min_objects=1, max_objects=2, relations=False)
    assert b.builder_config.name == f"n8_v2_s{SIZE}_seed0_obj1-2_norel"
    for j in range(8):
        assert 1 <= b.as_data_source()["train"][j]["object_boxes"].shape[0] <= 2
    assert shapes_grounding.config_name(num_train=8, num_val=2, image_size=SIZE, seed=0,
                                        min_objects=2, max_objects=5,
                                        relations=True) == f"n8_v2_s{SIZE}_seed0"
    with pytest.raises(ValueError, match="min_objects"):
        shapes_grounding.build(str(tmp_path), num_train=8, num_val=2, min_objects=3, max_objects=2)


def test_scene_knob_shape_sides(tmp_path):
    """data.shape_sides bounds every box side (small and large alike), keeps the layout rules
    (each expression still picks exactly its target) and enters the TFDS config name; bad
    ranges are refused by the builder and by the config, naming the key."""
    from perpo_jax.config import ConfigError, config_from_dict

    sides = (0.22, 0.28, 0.36, 0.46)
    ranges = {"small": (round(0.22 * SIZE), round(0.28 * SIZE)),
              "large": (round(0.36 * SIZE), round(0.46 * SIZE))}
    for i in range(30):
        x = shapes_grounding.make_example(3, "train", i, SIZE, sides=sides)
        for box, size in zip(x["object_boxes"], x["object_size"]):
            lo, hi = ranges[shapes_scene.SIZES[size]]
            width, height = np.round((box[2:] - box[:2]) * SIZE).astype(int)
            assert width == height and lo <= width <= hi, (i, width, size)
        assert shapes_scene.referred_objects(x["expression"], _scene_objects(x)) == [x["target"]]
    assert shapes_grounding.config_name(
        num_train=8, num_val=2, image_size=64, seed=0, min_objects=2, max_objects=5,
        relations=True, sides=sides) == f"n8_v2_s{SIZE}_seed0_sides0.22-0.28-0.36-0.46"
    with pytest.raises(ValueError, match="shape sides"):
        shapes_grounding.build(str(tmp_path), num_train=8, num_val=2, sides=(0.3, 0.2, 0.4, 0.5))
    assert config_from_dict({}, ["data.shape_sides=[0.22,0.28,0.36,0.46]"]).data.shape_sides == list(sides)
    with pytest.raises(ConfigError, match="data.shape_sides"):
        config_from_dict({}, ["data.shape_sides=[0.2,0.3,0.25,0.5]"])


def _scene_objects(x):
    """ShapeObjects back from a make_example dict (boxes in pixels, inclusive)."""
    out = []
    for box, sh, co, si in zip(x["object_boxes"], x["object_shape"], x["object_colour"],
                               x["object_size"]):
        px = np.round(box * SIZE).astype(int)
        out.append(shapes_scene.ShapeObject(shapes_scene.SHAPES[sh], shapes_scene.COLOUR_NAMES[co],
                                            shapes_scene.SIZES[si],
                                            (px[0], px[1], px[2] - 1, px[3] - 1)))
    return out


# ----------------------------------------------------------------------------- loader


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_deterministic_shuffle_and_drop_remainder():
    data = list(range(10))
    a = _take(ShardedLoader(data, 3, seed=1), 6)
    assert a == _take(ShardedLoader(data, 3, seed=1), 6)
    assert a != _take(ShardedLoader(data, 3, seed=2), 6)
    loader = ShardedLoader(data, 3, seed=1)
    assert loader.batches_per_epoch == 3  # 10 // 3, last partial batch dropped
    epoch0, epoch1 = a[:3], a[3:]
    assert all(len(b) == 3 for b in a)
    assert len(set(sum(epoch0, []))) == 9 and len(set(sum(epoch1, []))) == 9
    assert sum(epoch0, []) != sum(epoch1, [])  # a new permutation each epoch
    assert _take(ShardedLoader(data, 5, shuffle=False), 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_loader_host_shards_disjoint_and_covering():
    data = list(range(36))
    for epoch in (0, 1):
        shards = [ShardedLoader(data, 4, seed=3, process_index=h, process_count=3)
                  .epoch_indices(epoch).tolist() for h in range(3)]
        assert all(len(s) == 12 for s in shards)
        assert sorted(sum(shards, [])) == data
    hosts = [ShardedLoader(data, 4, seed=3, process_index=h, process_count=3) for h in range(3)]
    first_epoch = [sum(_take(h, 3), []) for h in hosts]
    assert sorted(sum(first_epoch, [])) == data
    with pytest.raises(ValueError, match="process_index=3"):
        ShardedLoader(data, 4, process_index=3, process_count=3)


def test_loader_resume_gives_same_continuation():
    data = [f"r{i}" for i in range(11)]
    loader = ShardedLoader(data, 2, seed=5, process_index=1, process_count=2)
    assert loader.batches_per_epoch == 2  # 11 // 2 hosts = 5 items -> 2 batches of 2
    _take(loader, 3)
    state = loader.state()
    assert set(state) == {"epoch", "batch"} and all(isinstance(v, int) for v in state.values())
    expected = _take(loader, 7)  # starts mid-epoch, crosses epoch boundaries
    fresh = ShardedLoader(data, 2, seed=5, process_index=1, process_count=2)
    fresh.restore(state)
    assert _take(fresh, 7) == expected
    with pytest.raises(ValueError, match="loader state"):
        fresh.restore({"epoch": 0, "batch": 99})


def test_loader_over_tfds_source_is_finite_with_num_epochs(grounding):
    source = grounding["a"].as_data_source()["train"]
    loader = ShardedLoader(source, 5, seed=0, num_epochs=2,
                           transform=lambda r: int(r["index"]))
    batches = list(loader)
    assert len(batches) == 2 * (24 // 5)
    assert len(set(sum(batches[:4], []))) == 20
    assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- local files

def _write_images(root):
    (root / "COCO").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "COCO" / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "COCO" / "grey.png")


def _official_file(tmp_path):
    good = {"image_id": 1, "image_path": "COCO/a.jpg",
            "question": "Please provide the bounding box coordinate of the region this sentence "
                        "describes: glass behind burger",
            "answer": "[0.61, 0.1, 0.77, 0.54]",
            "answers_gen": ["[0.61, 0.17, 0.77, 0.53]", "[0.57, 0.38, 0.69, 0.52]",
                            "[0.26, 0.17, 0.48, 0.45]"],
            "iou_scores": [0.8003244239631337, 0.14892014465734685, 0.0]}
    uneven = dict(good, iou_scores=[0.8, 0.1])
    missing = dict(good, image_path="COCO/nope.jpg")
    text = json.dumps([good, uneven, missing], indent=2)
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "  {"]
    path = tmp_path / "lists.json"
    path.write_text(text)
    return str(path), starts


def test_official_lists_errors_name_the_line_and_skip_reports(tmp_path):
    _write_images(tmp_path / "img")
    path, (l1, l2, l3) = _official_file(tmp_path)
    with pytest.raises(refcoco_style.DataFileError,
                       match=rf"lists.json:{l2}: 'answers_gen' has 3 items but 'iou_scores' has 2"):
        refcoco_style.read_official_lists(path, str(tmp_path / "img"))
    records, skipped = refcoco_style.read_official_lists(path, str(tmp_path / "img"),
                                                         skip_invalid=True)
    assert [r.line for r in records] == [l1] and [s.line for s in skipped] == [l2, l3]
    assert "nope.jpg not found" in skipped[1].reason
    r = records[0]
    assert r.candidates[1] == "[0.57, 0.38, 0.69, 0.52]" and r.scores.dtype == np.float32
    np.testing.assert_allclose(r.scores, [0.8003244, 0.1489201, 0.0], rtol=1e-6)
    assert r.image_path == str(tmp_path / "img" / "COCO" / "a.jpg")

    builder, built_skipped = refcoco_builders.build_official_lists(
        str(tmp_path / "tfds"), path, str(tmp_path / "img"), skip_invalid=True)
    assert [s.line for s in built_skipped] == [l2, l3]
    x = builder.as_data_source()["train"][0]
    assert [c.decode() for c in x["candidates"]] == list(r.candidates)
    np.testing.assert_array_equal(x["scores"], r.scores)
    np.testing.assert_array_equal(x["image"], np.asarray(Image.open(r.image_path)))
    assert "tensorflow" not in sys.modules


def test_official_lists_strip_eos_and_keep_answers_and_scores(tmp_path):
    """As the official reader: every "</s>" leaves the question; answer / scores stay as given."""
    _write_images(tmp_path / "img")
    item = {"image_id": 7, "image_path": "COCO/a.jpg",
            "question": "Please provide the bounding box coordinate of the region this sentence "
                        "describes: glass behind burger</s>",
            "answer": "[0.61, 0.1, 0.77, 0.54]</s>",
            "answers_gen": ["[0.61, 0.17, 0.77, 0.53]", "[0.26, 0.17, 0.48, 0.45]"],
            "iou_scores": [0.8003244239631337, 0.0]}
    path = tmp_path / "lists.jsonl"
    path.write_text(json.dumps(item) + "\n")
    (r,), _ = refcoco_style.read_official_lists(str(path), str(tmp_path / "img"))
    assert r.question == item["question"][:-len("</s>")]
    assert r.answer == item["answer"]  # never rewritten
    assert r.scores.tolist() == np.float32(item["iou_scores"]).tolist()  # never recomputed


def _refcoco_file(tmp_path):
    lines = [
        {"image": "COCO/a.jpg", "bbox": [4, 6, 10, 12], "sentence": "left cat", "split": "train",
         "ref_id": 9},
        "{not json",
        {"image": "COCO/missing.jpg", "bbox": [1, 1, 2, 2], "sentence": "x", "split": "train"},
        {"image": "COCO/a.jpg", "bbox": [35, 0, 10, 5], "sentence": "too wide", "split": "train"},
        {"image": "COCO/grey.png", "bbox": [0, 0, 20.5, 10], "sentence": " dog ", "split": "val"},
    ]
    path = tmp_path / "refs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_refcoco_jsonl_reader_and_builder(tmp_path):
    _write_images(tmp_path / "img")
    path, root = _refcoco_file(tmp_path), str(tmp_path / "img")
    with pytest.raises(refcoco_style.DataFileError, match=r"refs.jsonl:2: invalid JSON"):
        refcoco_style.read_refcoco_jsonl(path, root)
    records, skipped = refcoco_style.read_refcoco_jsonl(path, root, skip_invalid=True)
    assert [s.line for s in skipped] == [2, 3, 4]
    assert "missing.jpg not found" in skipped[1].reason and "outside" in skipped[2].reason
    first, grey = records
    np.testing.assert_allclose(first.box, [4 / 40, 6 / 30, 14 / 40, 18 / 30])  # W=40, H=30
    assert first.extra == {"ref_id": 9} and first.image_size == (40, 30)
    np.testing.assert_allclose(grey.box, [0, 0, 1, 0.5])  # 20.5 px wide: clipped to the image
    assert grey.sentence == "dog" and grey.split == "val"

    builder, built_skipped = refcoco_builders.build_refcoco_style(
        str(tmp_path / "tfds"), path, root, skip_invalid=True)
    assert [s.line for s in built_skipped] == [2, 3, 4]
    data = builder.as_data_source()
    assert sorted(data) == ["train", "val"] and len(data["train"]) == 1
    x = data["train"][0]
    assert x["answer"].decode() == "[0.10, 0.20, 0.35, 0.60]"
    assert x["question"].decode().endswith("describes: left cat")
    np.testing.assert_array_equal(x["image"], np.asarray(Image.open(first.image_path)))
    v = data["val"][0]
    assert v["image"].shape == (20, 20, 3)
    np.testing.assert_array_equal(v["image"][..., 0], np.asarray(Image.open(grey.image_path)))
    # A reused (already prepared) dataset still reports what was skipped.
    _, again = refcoco_builders.build_refcoco_style(str(tmp_path / "tfds"), path, root,
                                                    skip_invalid=True)
    assert again == built_skipped
    assert "tensorflow" not in sys.modules


def test_refcoco_builder_box_frame(tmp_path):
    """The padded frame is its own dataset; box and answer both move, the image does not."""
    _write_images(tmp_path / "img")
    path, root = _refcoco_file(tmp_path), str(tmp_path / "img")
    tfds_dir = str(tmp_path / "tfds")
    original, _ = refcoco_builders.build_refcoco_style(tfds_dir, path, root, skip_invalid=True)
    padded, _ = refcoco_builders.build_refcoco_style(tfds_dir, path, root, skip_invalid=True,
                                                     box_frame="padded")
    assert original.data_dir != padded.data_dir and "padded" in padded.builder_config.name
    x = padded.as_data_source()["train"][0]
    # 40x30 image, bbox [4, 6, 10, 12] px: the 40x40 square has the image at y offset 5.
    want = np.array([4, 11, 14, 23], np.float32) / 40
    np.testing.assert_allclose(x["box"], want, rtol=1e-6)
    # 2-decimal text of the padded box (23 / 40 = 0.575 sits on a rounding tie: check within 0.005)
    answer = [float(v) for v in x["answer"].decode().strip("[]").split(", ")]
    np.testing.assert_allclose(answer, want, atol=0.005 + 1e-6)
    np.testing.assert_array_equal(x["image"], original.as_data_source()["train"][0]["image"])
    with pytest.raises(ValueError, match="box_frame"):
        refcoco_builders.build_refcoco_style(tfds_dir, path, root, box_frame="square")


# ----------------------------------------------------------------------------- OCR


def _ink_crop(mask):
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], (xs.min(), ys.min(),
                                                                 xs.max() + 1, ys.max() + 1)


def _check_ocr_pixels(examples, *, size: int, font_size: int, pattern: str) -> None:
    """Each answer matches `pattern`, the ink lies in text_box, and the ink IS the answer drawn
    by an independent re-render (the same glyph pixels, translated)."""
    font = ImageFont.load_default(size=font_size)
    for x in examples:
        assert x["image"].shape == (size, size, 3) and x["question"] == b"What is the text in the image?"
        answer = x["answer"].decode()
        assert re.fullmatch(pattern, answer), answer
        ink = (x["image"] < ocr_text.INK_THRESHOLD).all(-1)
        assert (x["image"][~ink] >= 150).all()  # background is clearly light
        crop, box = _ink_crop(ink)
        np.testing.assert_allclose(x["text_box"] * size, box, atol=1e-4)
        ref = Image.new("L", (200, 100), 0)
        draw = ImageDraw.Draw(ref)
        draw.fontmode = "1"
        draw.multiline_text((10, 10), answer, fill=255, font=font, spacing=max(1, font_size // 4))
        np.testing.assert_array_equal(crop, _ink_crop(np.asarray(ref) > 0)[0])


def test_ocr_builder_deterministic_and_pixels_spell_the_answer(tmp_path):
    kw = dict(num_train=6, num_val=2, image_size=96, font_size=12)
    a = shapes_ocr.build(str(tmp_path / "a"), seed=1, **kw)
    b = shapes_ocr.build(str(tmp_path / "b"), seed=1, **kw)
    c = shapes_ocr.build(str(tmp_path / "c"), seed=2, **kw)
    for split in ("train", "val"):
        assert _raw_records(a, split) == _raw_records(b, split) != _raw_records(c, split)
    data = a.as_data_source()
    examples = [data["train"][i] for i in range(6)] + [data["val"][i] for i in range(2)]
    _check_ocr_pixels(examples, size=96, font_size=12,
                      pattern=r"[a-z0-9]{2,6}( [a-z0-9]{2,6})?(\n[a-z0-9]{2,6}( [a-z0-9]{2,6})?){0,2}")
    assert "tensorflow" not in sys.modules


def test_ocr_text_settings(tmp_path):
    """data.ocr_font_size / ocr_max_lines / ocr_max_words / ocr_pitch / ocr_placement: one word
    per image at 16 px on a 64 px image, and the OCR demo's monospace word crops; the settings
    enter the dataset's name only when not the defaults, and bad ones are refused naming the
    key."""
    builder = shapes_ocr.build(str(tmp_path), num_train=5, num_val=1, image_size=64,
                               font_size=16, max_lines=1, max_words=1)
    assert builder.builder_config.name == "n5_v1_s64_f16_seed0_l1w1"
    data = builder.as_data_source()
    _check_ocr_pixels([data["train"][i] for i in range(5)] + [data["val"][0]], size=64,
                      font_size=16, pattern=r"[a-z0-9]{2,6}")
    # the OCR demo's task: 8 px monospace cells, left-placed; ink starts 4 px from the left
    # edge, is vertically centred, and n characters span more than n - 1 cells (proportional
    # 12 px text of narrow letters would not) and at most n
    crops = shapes_ocr.build(str(tmp_path / "crops"), num_train=12, num_val=1, image_size=64,
                             max_lines=1, max_words=1, pitch=8, placement="left")
    assert crops.builder_config.name == "n12_v1_s64_f12_seed0_l1w1_pitch8_left"
    for x in (crops.as_data_source()["train"][i] for i in range(12)):
        answer = x["answer"].decode()
        assert re.fullmatch(r"[a-z0-9]{2,6}", answer), answer
        x0, y0, x1, y1 = np.round(x["text_box"] * 64).astype(int)
        assert x0 == 4 and y0 == (64 - (y1 - y0)) // 2, (x0, y0, x1, y1)
        assert 8 * (len(answer) - 1) < x1 - x0 <= 8 * len(answer), (answer, x1 - x0)

    from perpo_jax.config import ConfigError, config_from_dict

    cfg = config_from_dict({}, ["data.ocr_font_size=16", "data.ocr_max_lines=1",
                                "data.ocr_max_words=1"])
    assert (cfg.data.ocr_font_size, cfg.data.ocr_max_lines, cfg.data.ocr_max_words) == (16, 1, 1)
    for key, value in (("ocr_font_size", 5), ("ocr_max_lines", 0), ("ocr_max_words", 0),
                       ("ocr_pitch", -1), ("ocr_placement", "top")):
        with pytest.raises(ConfigError, match=f"^data.{key}: "):
            config_from_dict({}, [f"data.{key}={value}"])
    with pytest.raises(ValueError, match="max_words"):
        shapes_ocr.build(str(tmp_path / "bad"), max_words=0)
