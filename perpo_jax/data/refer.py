"""Reader for the refer-toolkit layout of RefCOCO / RefCOCO+ / RefCOCOg (lichengunc/refer).

    <refer_dir>/refs(<split_by>).p    pickle: list of refs, one per referred object
        {"ref_id": int, "ann_id": int, "image_id": int, "category_id": int,
         "split": "train" | "val" | "testA" | "testB" | "test" (google / umd),
         "sentences": [{"sent": str, "raw": str, "tokens": [str], "sent_id": int}, ...],
         "file_name": "COCO_train2014_000000581857_16.jpg", ...}
    <refer_dir>/instances.json        COCO style:
        {"images": [{"id", "file_name", "width", "height"}],
         "annotations": [{"id", "image_id", "bbox": [x, y, w, h] pixels, "category_id"}],
         "categories": [...]}
    <image_root>/<file_name>          COCO train2014 images (the file_name of instances.json;
                                      a ref's own "file_name" carries an annotation suffix)

`read_refer` yields one `RefExpression` per (ref, sentence): the text is the toolkit's
normalised "sent", the box the annotation's bbox normalised by the image's own size (the
"original" frame, as `refcoco_style.read_refcoco_jsonl` does). The image file must exist and
have the size instances.json gives (else the boxes would be wrong).

A pickle can run code while it is loaded, so the refs file is read by `load_refs`, an unpickler
that admits builtin containers and scalars only and refuses every other global (os.system, a
class, ...) before anything is called. Python 2 pickles (the toolkit's own) load too: their byte
strings are decoded as UTF-8, or Latin-1 where that fails.

Errors name the file and the entry ("refs(unc).p: entry 3 (ref_id 13, ann_id 999): ...";
entry = 0-based index in the refs list). With `skip_invalid=True` a bad ref (or a bad sentence of
a ref) is skipped, logged and returned as a `Skipped` whose `line` is the entry index.
"""
from __future__ import annotations

import builtins
import codecs
import io
import json
import logging
import os
import pickle

from perpo_jax.data.refcoco_style import (DataFileError, RefExpression, Skipped, _field,
                                          _image_file, _image_size, _normalised_box, _split_name)

log = logging.getLogger(__name__)

SPLIT_BYS = ("unc", "umd", "google")  # the refs(<split_by>).p files the toolkit ships

# The only globals a refs pickle may name: containers/scalars that Python 2 and 3 pickles refer
# to by name (sets, bytearrays, bytes at protocol < 3). Calling them builds data, runs no code.
_SAFE_BUILTINS = frozenset({"set", "frozenset", "bytearray", "bytes", "list", "dict", "tuple",
                            "int", "float", "complex", "str", "bool"})


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol < 3, limited to that use."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, encoding)


class _RefsUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` admits `_SAFE_BUILTINS` (and latin-1 bytes) only."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: a refs pickle may hold only builtin containers and "
            "scalars (unpickling anything else can run code)")


def load_refs(path: str) -> list:
    """The list stored in a refs(<split_by>).p pickle, loaded without running any code.

    Raises FileNotFoundError (missing file) or DataFileError naming `path` (a refused global,
    a corrupt pickle, or a top-level object that is not a list).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"refs file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    # Python 2 str objects come back as text: UTF-8 first (ASCII-safe), Latin-1 always decodes.
    for encoding in ("utf-8", "latin1"):
        try:
            refs = _RefsUnpickler(io.BytesIO(data), encoding=encoding).load()
            break
        except UnicodeDecodeError:
            continue
        except Exception as e:  # noqa: BLE001 -- a corrupt pickle fails in many ways
            raise DataFileError(f"{path}: cannot be loaded as a refs pickle: {e}") from None
    if not isinstance(refs, list):
        raise DataFileError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _load_instances(path: str) -> tuple[dict, dict]:
    """instances.json -> ({image id: image dict}, {annotation id: annotation dict})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instances file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            instances = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(instances, dict):
        raise DataFileError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    tables = []
    for key in ("images", "annotations"):
        entries = instances.get(key)
        if not isinstance(entries, list):
            raise DataFileError(f"{path}: {key!r} must be a list")
        # Entries without an id cannot be referred to; a ref naming one fails by its id.
        tables.append({e["id"]: e for e in entries if isinstance(e, dict) and "id" in e})
    return tables[0], tables[1]


def _ref_label(ref) -> str:
    """'ref_id 13, ann_id 999' (whatever of the two the entry has) for messages."""
    if not isinstance(ref, dict):
        return ""
    return ", ".join(f"{k} {ref[k]!r}" for k in ("ref_id", "ann_id") if k in ref)


def _referred_object(ref, images: dict, anns: dict, image_root: str, sizes: dict,
                     instances_path: str) -> dict:
    """The fields every sentence of one ref shares; raises DataFileError naming what is wrong."""
    if not isinstance(ref, dict):
        raise DataFileError(f"expected a dict, got {type(ref).__name__}")
    ref_id, ann_id = _field(ref, "ref_id", int), _field(ref, "ann_id", int)
    image_id = _field(ref, "image_id", int)
    split = _split_name(_field(ref, "split", str))
    ann = anns.get(ann_id)
    if ann is None:
        raise DataFileError(f"ann_id {ann_id} not in {instances_path}")
    if ann.get("image_id") != image_id:
        raise DataFileError(f"image_id {image_id} but annotation {ann_id} is on image "
                            f"{ann.get('image_id')!r}")
    image = images.get(image_id)
    if image is None:
        raise DataFileError(f"image_id {image_id} not in {instances_path}")
    try:
        file_name = _field(image, "file_name", str)
        width, height = _field(image, "width", int), _field(image, "height", int)
    except DataFileError as e:
        raise DataFileError(f"image {image_id} in {instances_path}: {e}") from None
    path = _image_file(image_root, file_name)
    if _image_size(path, sizes) != (width, height):
        actual = "x".join(map(str, _image_size(path, sizes)))
        raise DataFileError(f"image {path} is {actual} but {instances_path} says "
                            f"{width}x{height}")
    try:
        bbox = _field(ann, "bbox", list)
        box = _normalised_box(bbox, width, height)
    except DataFileError as e:
        raise DataFileError(f"annotation {ann_id}: {e}") from None
    extra = {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
             "category_id": ref.get("category_id")}
    return {"image_path": path, "image_size": (width, height),
            "bbox_xywh": tuple(float(v) for v in bbox), "box": box, "split": split,
            "extra": extra}


def _sentence(sent) -> tuple[str, object]:
    """(normalised text, sent_id) of one entry of a ref's "sentences"."""
    if not isinstance(sent, dict):
        raise DataFileError(f"a sentence must be a dict, got {type(sent).__name__}")
    text = _field(sent, "sent", str).strip()
    if not text:
        raise DataFileError(f"sentence {sent.get('sent_id')!r} is empty")
    return text, sent.get("sent_id")


def read_refer(refer_dir: str, image_root: str, *, split_by: str = "unc",
               skip_invalid: bool = False):
    """refer-toolkit layout -> (list[RefExpression], list[Skipped]). See module docstring.

    RefExpression.line is the ref's entry index; extra holds ref_id, ann_id, image_id,
    category_id and sent_id.
    """
    if split_by not in SPLIT_BYS:
        raise ValueError(f"split_by must be one of {SPLIT_BYS}, got {split_by!r}")
    refs_path = os.path.join(refer_dir, f"refs({split_by}).p")
    instances_path = os.path.join(refer_dir, "instances.json")
    refs = load_refs(refs_path)
    images, anns = _load_instances(instances_path)
    sizes: dict[str, tuple[int, int]] = {}  # images are shared by many refs
    records, skipped = [], []

    def reject(entry: int, ref, error: DataFileError) -> None:
        label = _ref_label(ref)
        reason = f"{label}: {error}" if label else str(error)
        if not skip_invalid:
            raise DataFileError(f"{refs_path}: entry {entry}"
                                + (f" ({label})" if label else "") + f": {error}") from None
        log.warning("skipping %s entry %d: %s", refs_path, entry, reason)
        skipped.append(Skipped(refs_path, entry, reason))

    for entry, ref in enumerate(refs):
        try:
            obj = _referred_object(ref, images, anns, image_root, sizes, instances_path)
            sentences = _field(ref, "sentences", list)
            if not sentences:
                raise DataFileError("'sentences' is empty")
        except DataFileError as e:
            reject(entry, ref, e)
            continue
        for k, sent in enumerate(sentences):
            try:
                text, sent_id = _sentence(sent)
            except DataFileError as e:
                reject(entry, ref, DataFileError(f"sentence {k}: {e}"))
                continue
            records.append(RefExpression(
                image_path=obj["image_path"], image_size=obj["image_size"],
                bbox_xywh=obj["bbox_xywh"], box=obj["box"], sentence=text, split=obj["split"],
                line=entry, extra=dict(obj["extra"], sent_id=sent_id)))
    return records, skipped
