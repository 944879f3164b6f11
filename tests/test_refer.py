"""refer-toolkit layout (refs(<split_by>).p + instances.json + COCO images): records, boxes in
both frames, splits, error messages, skip_invalid, and a pickle reader that runs no code."""
import json
import os
import pickle
import pickletools
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from perpo_jax.data import refcoco_builders, refer
from perpo_jax.data.refcoco_style import DataFileError


class CustomRef:
    """A class a hostile (or merely foreign) pickle could name."""


class RunsCommand:
    """Unpickling this would run a shell command (os.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _py2_pickle(obj) -> bytes:
    """Protocol 2 bytes as Python 2 writes them: text as byte strings (BINSTRING, UTF-8 bytes),
    the form of the toolkit's own refs(*).p files; handles dict / list / str / int."""
    out = bytearray(b"\x80\x02")

    def emit(x):
        if isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, str):
            raw = x.encode("utf-8")
            out.extend(b"T" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(x, list):
            out.extend(b"]")
            for item in x:
                emit(item)
                out.extend(b"a")
        elif isinstance(x, dict):
            out.extend(b"}")
            for key, value in x.items():
                emit(key)
                emit(value)
                out.extend(b"s")
        else:
            raise TypeError(type(x))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def _sentence(text, sent_id):
    return {"sent": text, "raw": text.capitalize() + ".", "tokens": text.split(),
            "sent_id": sent_id}


def _ref(entry_ref_id, ann_id, image_id, split, *sentences):
    return {"ref_id": entry_ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "category_id": 1, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sentences": list(sentences)}


REFS = [
    _ref(10, 100, 1, "train", _sentence("left cat", 1000), _sentence("café sign", 1001)),
    _ref(11, 101, 2, "testA", _sentence("tall lamp", 1002)),
    _ref(12, 102, 1, "val", _sentence("right half", 1003)),
    _ref(13, 999, 1, "train", _sentence("no annotation", 1004)),       # entry 3: unknown ann
    _ref(14, 103, 3, "train", _sentence("no image file", 1005)),       # entry 4: missing file
    _ref(15, 104, 4, "testB", _sentence("wrong size", 1006)),          # entry 5: size mismatch
    _ref(16, 101, 2, "testB", _sentence(" ", 1007), _sentence("lamp again", 1008)),  # 6: 1 empty
]


def _name(image_id, ext):
    return f"COCO_train2014_{image_id:012d}.{ext}"


def _write_layout(root, refs=REFS, refs_bytes=None):
    """refer_dir with refs(unc).p + instances.json; images/ with 3 non-square files."""
    refer_dir, images = root / "refcoco", root / "train2014"
    refer_dir.mkdir(parents=True, exist_ok=True)
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        images / _name(1, "jpg"))
    Image.fromarray(rng.integers(0, 256, (36, 20, 3), dtype=np.uint8)).save(
        images / _name(2, "png"))
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        images / _name(4, "png"))
    instances = {
        "images": [{"id": 1, "file_name": _name(1, "jpg"), "width": 40, "height": 30},
                   {"id": 2, "file_name": _name(2, "png"), "width": 20, "height": 36},
                   {"id": 3, "file_name": _name(3, "jpg"), "width": 40, "height": 30},
                   {"id": 4, "file_name": _name(4, "png"), "width": 50, "height": 50}],
        "annotations": [{"id": 100, "image_id": 1, "bbox": [4, 6, 10, 12], "category_id": 1},
                        {"id": 101, "image_id": 2, "bbox": [2, 9, 8, 18], "category_id": 1},
                        {"id": 102, "image_id": 1, "bbox": [20, 0, 20, 30], "category_id": 1},
                        {"id": 103, "image_id": 3, "bbox": [1, 1, 2, 2], "category_id": 1},
                        {"id": 104, "image_id": 4, "bbox": [1, 1, 2, 2], "category_id": 1}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (refer_dir / "instances.json").write_text(json.dumps(instances))
    (refer_dir / "refs(unc).p").write_bytes(refs_bytes if refs_bytes is not None
                                            else _py2_pickle(refs))
    return str(refer_dir), str(images)


def test_py2_helper_writes_byte_strings():
    """The test's Python 2 pickle really uses BINSTRING (not Python 3's BINUNICODE)."""
    ops = {op.name for op, _, _ in pickletools.genops(_py2_pickle([{"sent": "café"}]))}
    assert "BINSTRING" in ops and "BINUNICODE" not in ops


def test_reader_records_boxes_and_errors(tmp_path):
    refer_dir, images = _write_layout(tmp_path)
    with pytest.raises(DataFileError, match=r"refs\(unc\)\.p: entry 3 \(ref_id 13, ann_id 999\): "
                                            r"ann_id 999 not in .*instances\.json"):
        refer.read_refer(refer_dir, images)
    records, skipped = refer.read_refer(refer_dir, images, skip_invalid=True)

    assert [s.line for s in skipped] == [3, 4, 5, 6]
    assert all(s.path.endswith("refs(unc).p") for s in skipped)
    assert skipped[1].reason.startswith("ref_id 14, ann_id 103: image ")
    assert _name(3, "jpg") + " not found" in skipped[1].reason
    assert "is 30x20 but" in skipped[2].reason and "says 50x50" in skipped[2].reason
    assert "sentence 0: sentence 1007 is empty" in skipped[3].reason

    by_sentence = {r.sentence: r for r in records}
    assert list(by_sentence) == ["left cat", "café sign", "tall lamp", "right half", "lamp again"]
    cat = by_sentence["left cat"]
    np.testing.assert_allclose(cat.box, [4 / 40, 6 / 30, 14 / 40, 18 / 30])  # original frame
    assert cat.image_size == (40, 30) and cat.split == "train" and cat.line == 0
    assert cat.image_path == os.path.join(images, _name(1, "jpg"))
    assert cat.extra == {"ref_id": 10, "ann_id": 100, "image_id": 1, "category_id": 1,
                         "sent_id": 1000}
    assert by_sentence["café sign"].extra["sent_id"] == 1001  # UTF-8 byte string decoded
    lamp = by_sentence["tall lamp"]
    np.testing.assert_allclose(lamp.box, [0.1, 0.25, 0.5, 0.75])
    assert lamp.split == "testA" and by_sentence["lamp again"].split == "testB"


def test_reader_file_errors(tmp_path):
    refer_dir, images = _write_layout(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p"):
        refer.read_refer(refer_dir, images, split_by="google")
    with pytest.raises(ValueError, match="split_by"):
        refer.read_refer(refer_dir, images, split_by="../x")
    bad = [dict(REFS[0], split="test A")]
    refer_dir, images = _write_layout(tmp_path, refs=bad)
    with pytest.raises(DataFileError, match=r"entry 0 \(ref_id 10, ann_id 100\): split 'test A'"):
        refer.read_refer(refer_dir, images)
    (tmp_path / "refcoco" / "instances.json").write_text('{"images": []}')
    with pytest.raises(DataFileError, match=r"instances\.json: 'annotations' must be a list"):
        refer.read_refer(refer_dir, images)


@pytest.mark.parametrize("payload,refused", [
    (lambda marker: [RunsCommand(marker)], r"refused global (posix|nt)\.system"),
    (lambda marker: [eval], r"refused global (__builtin__|builtins)\.eval"),
    (lambda marker: [{"ref_id": CustomRef()}], r"refused global .*CustomRef"),
], ids=["os.system", "eval", "custom class"])
def test_pickle_with_other_globals_is_refused_and_runs_nothing(tmp_path, payload, refused):
    marker = tmp_path / "ran"
    refer_dir, images = _write_layout(
        tmp_path, refs_bytes=pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(DataFileError, match=r"refs\(unc\)\.p: cannot be loaded .*" + refused):
        refer.read_refer(refer_dir, images, skip_invalid=True)  # never skippable
    assert not marker.exists()


def test_load_refs_admits_builtin_data_only(tmp_path):
    data = [{"a": {1, 2}, "b": frozenset({3}), "c": b"\x00\xff", "d": (1.5, None, True)}]
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # protocol 2 names set / _codecs.encode
        path = tmp_path / f"refs_{protocol}.p"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert refer.load_refs(str(path)) == data
    path.write_bytes(b"\x80\x02]T\x04\x00\x00\x00caf\xe9a.")  # Python 2 str, not UTF-8
    assert refer.load_refs(str(path)) == ["café"]  # falls back to Latin-1
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(DataFileError, match="expected a list of refs, got dict"):
        refer.load_refs(str(path))
    path.write_bytes(pickle.dumps([1, 2, 3])[:-3])
    with pytest.raises(DataFileError, match="cannot be loaded as a refs pickle"):
        refer.load_refs(str(path))


def test_builder_splits_frames_and_reuse(tmp_path):
    refer_dir, images = _write_layout(tmp_path)
    tfds_dir = str(tmp_path / "tfds")
    builder, skipped = refcoco_builders.build_refer(tfds_dir, refer_dir, images, skip_invalid=True)
    assert [s.line for s in skipped] == [3, 4, 5, 6]
    assert builder.builder_config.name == "default_unc_original"
    data = builder.as_data_source()
    assert sorted(data) == ["testA", "testB", "train", "val"]
    assert {k: len(v) for k, v in data.items()} == {"testA": 1, "testB": 1, "train": 2, "val": 1}
    train = sorted((data["train"][i] for i in range(2)), key=lambda x: x["sentence"])
    assert [x["sentence"].decode() for x in train] == ["café sign", "left cat"]
    assert train[1]["question"].decode().endswith("describes: left cat")
    assert train[1]["answer"].decode() == "[0.10, 0.20, 0.35, 0.60]"
    np.testing.assert_array_equal(
        train[1]["image"], np.asarray(Image.open(os.path.join(images, _name(1, "jpg")))))
    lamp = data["testA"][0]
    assert lamp["answer"].decode() == "[0.10, 0.25, 0.50, 0.75]"
    np.testing.assert_array_equal(
        lamp["image"], np.asarray(Image.open(os.path.join(images, _name(2, "png")))))

    padded, _ = refcoco_builders.build_refer(tfds_dir, refer_dir, images, skip_invalid=True,
                                             box_frame="padded")
    assert padded.builder_config.name == "default_unc_padded"
    lamp = padded.as_data_source()["testA"][0]
    # 20x36 image in a 36x36 square at x offset (36 - 20) // 2 = 8: bbox [2, 9, 8, 18] px.
    np.testing.assert_allclose(lamp["box"], [10 / 36, 9 / 36, 18 / 36, 27 / 36], rtol=1e-6)
    assert lamp["answer"].decode() == "[0.28, 0.25, 0.50, 0.75]"

    _, again = refcoco_builders.build_refer(tfds_dir, refer_dir, images, skip_invalid=True)
    assert again == skipped  # a reused dataset still reports what was skipped
    assert "tensorflow" not in sys.modules
