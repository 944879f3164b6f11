"""Page-OCR reader (JSONL and the Fox benchmark layout) and its TFDS builder."""
import json

import numpy as np
import pytest
from PIL import Image

from perpo_jax.data.page_ocr import (PAGE_OCR_QUESTION, build_page_ocr, read_page_ocr)
from perpo_jax.data.examples import prompt_batch_for, record_example
from perpo_jax.data.refcoco_style import DataFileError


def _page(path, size=(40, 24), colour=(250, 250, 250), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 200).save(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _fox_entry(image, text, prompt="<image>\nOCR this page: "):
    return {"image": image, "conversations": [{"from": "human", "value": prompt},
                                              {"from": "gpt", "value": text}]}


def test_jsonl_paths_relative_to_the_file_or_absolute(tmp_path):
    _page(tmp_path / "pages" / "p1.png")
    absolute = _page(tmp_path / "elsewhere" / "p2.png")
    ann = _jsonl(tmp_path / "ann.jsonl", [
        {"image": "pages/p1.png", "text": "Line one\nline two "},
        "",
        {"image": str(absolute), "text": "x", "question": " Read it. ", "split": "val"}])
    pages, skipped = read_page_ocr(str(ann))
    assert skipped == []
    assert [p.image_path for p in pages] == [str(tmp_path / "pages" / "p1.png"), str(absolute)]
    assert [p.text for p in pages] == ["Line one\nline two ", "x"]  # kept exactly
    assert [p.question for p in pages] == [PAGE_OCR_QUESTION, "Read it."]
    assert [(p.split, p.line) for p in pages] == [("train", 1), ("val", 3)]


def test_fox_layout(tmp_path):
    _page(tmp_path / "en_pdf_png" / "en_1.png")
    _page(tmp_path / "en_pdf_png" / "en_2.png")
    ann = tmp_path / "en_page_ocr.json"
    ann.write_text(json.dumps([_fox_entry("en_1.png", "First page.\nMore text."),
                               _fox_entry("en_2.png", "Second page.")], indent=1))
    pages, skipped = read_page_ocr(str(ann), str(tmp_path / "en_pdf_png"), fmt="fox")
    assert skipped == []
    assert [p.text for p in pages] == ["First page.\nMore text.", "Second page."]
    assert {p.question for p in pages} == {"OCR this page:"}  # image token removed, stripped
    assert [p.split for p in pages] == ["train", "train"]
    assert pages[1].line > pages[0].line > 1  # the line each array entry starts on


@pytest.mark.parametrize("row, message", [
    ('{"image": "p.png", "text": "x"', "invalid JSON"),
    ({"text": "x"}, "missing key 'image'"),
    ({"image": "p.png", "text": "  "}, "'text' is empty"),
    ({"image": "p.png", "text": 3}, "key 'text' has type int"),
    ({"image": "gone.png", "text": "x"}, "gone.png not found"),
    ({"image": "p.png", "text": "x", "split": "a b"}, "not a valid split name"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, row, message):
    _page(tmp_path / "p.png")
    ann = _jsonl(tmp_path / "ann.jsonl", [{"image": "p.png", "text": "ok"}, row])
    with pytest.raises(DataFileError, match=f"ann.jsonl:2: .*{message}"):
        read_page_ocr(str(ann))


def test_malformed_fox_entry_names_file_and_line(tmp_path):
    _page(tmp_path / "a.png")
    bad = {"image": "a.png", "conversations": [{"from": "gpt", "value": "x"},
                                               {"from": "gpt", "value": "y"}]}
    ann = tmp_path / "fox.json"
    ann.write_text("[\n" + json.dumps(_fox_entry("a.png", "ok")) + ",\n" + json.dumps(bad)
                   + "\n]")
    with pytest.raises(DataFileError, match=r"fox.json:3: .*\['from'\] must be 'human'"):
        read_page_ocr(str(ann), fmt="fox")


def test_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "p.png").write_bytes(b"not an image")
    ann = _jsonl(tmp_path / "ann.jsonl", [{"image": "p.png", "text": "x"}])
    with pytest.raises(DataFileError, match="ann.jsonl:1: image .* cannot be read"):
        read_page_ocr(str(ann))


def test_skip_invalid_skips_and_counts(tmp_path):
    _page(tmp_path / "p.png")
    ann = _jsonl(tmp_path / "ann.jsonl", [
        {"image": "p.png", "text": "one"}, "{broken", {"image": "nope.png", "text": "x"},
        {"image": "p.png", "text": "two"}, {"image": "p.png"}])
    pages, skipped = read_page_ocr(str(ann), skip_invalid=True)
    assert [p.text for p in pages] == ["one", "two"]
    assert [s.line for s in skipped] == [2, 3, 5]
    assert all(s.path == str(ann) for s in skipped)
    assert "missing key 'text'" in skipped[2].reason


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="fmt must be one of"):
        read_page_ocr(str(tmp_path / "x.json"), fmt="xml")


def test_builder_gives_ocr_records_and_keeps_skipped(tmp_path):
    _page(tmp_path / "img" / "p1.png", size=(30, 20), colour=(10, 20, 30))
    _page(tmp_path / "img" / "grey.png", size=(16, 12), mode="L")  # stored as RGB
    ann = _jsonl(tmp_path / "ann.jsonl", [
        {"image": "p1.png", "text": "alpha beta"}, {"image": "missing.png", "text": "x"},
        {"image": "grey.png", "text": "gamma", "split": "val"}])
    builder, skipped = build_page_ocr(str(tmp_path / "data"), str(ann), str(tmp_path / "img"),
                                      name="t", skip_invalid=True)
    assert [s.line for s in skipped] == [2]
    sources = builder.as_data_source()
    assert sorted(sources) == ["train", "val"]
    train = record_example(sources["train"][0])
    assert train.image.shape == (20, 30, 3) and (train.image[0, 0] == [10, 20, 30]).all()
    assert (train.question, train.answer, train.box) == (PAGE_OCR_QUESTION, "alpha beta", None)
    val = record_example(sources["val"][0])
    assert val.image.shape == (12, 16, 3) and np.all(val.image == 200)
    # reopened from disk, the skipped lines are still known
    _, again = build_page_ocr(str(tmp_path / "data"), str(ann), str(tmp_path / "img"),
                              name="t", skip_invalid=True)
    assert [s.line for s in again] == [2]


def test_prepare_data_reads_page_ocr_with_images_next_to_the_file(tmp_path):
    from perpo_jax.config import load_config
    from perpo_jax.data import prepare

    _page(tmp_path / "pages" / "a.png", size=(40, 30), colour=(200, 10, 10))
    ann = _jsonl(tmp_path / "ocr.jsonl", [
        {"image": "pages/a.png", "text": "first page"},
        {"image": "pages/a.png", "text": "same page, val", "split": "val"}])
    cfg = load_config(None, [
        "model.tiny={hidden_size: 32, num_layers: 1}", "lora.enabled=false",
        "data.image_size=32", f"data.data_dir={tmp_path / 'data'}", "data.task=ocr",
        "data.source=page_ocr", f"data.path={ann}"])  # no data.image_dir: the file's dir
    data = prepare.prepare_data(cfg, progress=False)
    assert (len(data.train), len(data.val), data.task) == (1, 1, "ocr")
    example = record_example(data.train[0])
    assert example.answer == "first page" and example.image.shape == (30, 40, 3)
    batch = prompt_batch_for([example], data.processor, None)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert not prepare.prepare_data(cfg, progress=False).built  # reused
