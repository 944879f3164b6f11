"""perpo_jax.build: config → data handle, processor, model, prompt batches."""
import json
import os

import numpy as np
import pytest

from perpo_jax.data import prepare
from perpo_jax.data.examples import prompt_batch_for, record_example
from perpo_jax import assemble
from perpo_jax.config import ConfigError, load_config

TINY = ["model.tiny={hidden_size: 32, num_layers: 1}", "lora.enabled=false",
        "data.num_train=16", "data.num_val=8", "data.image_size=32"]


def tiny_cfg(data_dir, *extra):
    return load_config(None, TINY + [f"data.data_dir={data_dir}", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("data"))
    return cfg, prepare.prepare_data(cfg, progress=False)


def _files_with_mtimes(root):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def test_prepare_data_is_idempotent(prepared):
    cfg, data = prepared
    assert (len(data.train), len(data.val)) == (16, 8)
    assert data.task == "grounding" and os.path.isdir(data.processor_dir)
    before = _files_with_mtimes(cfg.data.data_dir)
    again = prepare.prepare_data(cfg, progress=False)
    assert _files_with_mtimes(cfg.data.data_dir) == before  # nothing regenerated
    assert again.processor_dir == data.processor_dir
    assert again.processor.tokenizer.get_vocab() == data.processor.tokenizer.get_vocab()
    first, second = record_example(data.val[3]), record_example(again.val[3])
    assert first.question == second.question and np.array_equal(first.image, second.image)


def test_scene_knobs_reach_the_builder(tmp_path):
    """data.min_objects / max_objects / relations are the builder's settings and its name."""
    cfg = tiny_cfg(tmp_path, "data.min_objects=1", "data.max_objects=2", "data.relations=false")
    builder, _ = prepare._build_dataset(cfg)
    bc = builder.builder_config
    assert (bc.min_objects, bc.max_objects, bc.relations) == (1, 2, False)
    assert bc.name.endswith("_obj1-2_norel")
    train = builder.as_data_source()["train"]
    assert all(1 <= train[i]["object_boxes"].shape[0] <= 2 for i in range(len(train)))


def test_processor_image_tokens_match_tiny_model(prepared):
    cfg, data = prepared
    proc = data.processor
    model_cfg = assemble.tiny_model_config(cfg, proc)
    assert model_cfg.vision.image_size == 32 and model_cfg.text.hidden_size == 32
    assert model_cfg.image_token_id == proc.image_token_id
    assert model_cfg.text.vocab_size == len(proc.tokenizer)
    example = record_example(data.train[0])
    ids = proc(example.image, example.question)["prompt_ids"]
    assert int((ids == proc.image_token_id).sum()) == model_cfg.num_image_tokens == 16


def test_build_model_forward_on_prompt_batch(prepared):
    cfg, data = prepared
    mesh = assemble.build_mesh(cfg)
    model = assemble.build_run_model(cfg, mesh, data.processor)
    examples = [record_example(data.val[i]) for i in range(3)]
    batch = prompt_batch_for(examples, data.processor, None)
    b, p = batch["prompt_ids"].shape
    assert batch["prompt_ids"].dtype == np.int32 and batch["prompt_mask"].dtype == bool
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    logits = model(batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"])
    assert logits.shape == (b, p, len(data.processor.tokenizer))
    assert np.isfinite(np.asarray(logits)).all()
    # same seed, same weights: the model is a function of the config
    again = assemble.build_run_model(cfg, mesh, data.processor)
    np.testing.assert_array_equal(np.asarray(again(batch["prompt_ids"], batch["prompt_mask"],
                                                    batch["pixel_values"])), np.asarray(logits))


def test_model_processor_mismatch_names_both(prepared):
    cfg, data = prepared
    proc = data.processor
    good = assemble.tiny_model_config(cfg, proc)
    wrong_id = good.replace(image_token_id=proc.image_token_id - 1)
    with pytest.raises(assemble.ModelProcessorMismatch,
                       match=f"image_token_id={proc.image_token_id - 1}.*{proc.image_token_id}"):
        assemble.check_model_processor(wrong_id, proc)
    small = good.replace(text=good.text.replace(vocab_size=len(proc.tokenizer) - 1))
    with pytest.raises(assemble.ModelProcessorMismatch, match=f"vocab_size={len(proc.tokenizer) - 1}"):
        assemble.check_model_processor(small, proc)


def test_bad_tiny_key_is_a_config_error(prepared):
    cfg, _ = prepared
    bad = load_config(None, TINY + ["model.tiny={hidden_size: 32, layers: 1}"])
    with pytest.raises(ConfigError, match="model.tiny.layers"):
        assemble.tiny_geometry(bad)
    reserved = load_config(None, TINY + ["model.tiny={dtype: bfloat16}"])
    with pytest.raises(ConfigError, match="model.tiny.dtype"):
        assemble.tiny_geometry(reserved)


def test_record_example_decodes_bytes_boxes_and_lists():
    image = np.zeros((8, 8, 3), np.uint8)
    grounding = record_example({"image": image, "question": b"where is it?",
                                      "answer": b"[0.10, 0.20, 0.30, 0.40]",
                                      "box": np.array([0.1, 0.2, 0.3, 0.4], np.float32)})
    assert grounding.question == "where is it?" and isinstance(grounding.answer, str)
    assert grounding.box.dtype == np.float32 and grounding.responses is None
    ocr = record_example({"image": image, "question": b"text?", "answer": "ab\ncd".encode()})
    assert ocr.answer == "ab\ncd" and ocr.box is None and ocr.rewards is None
    lists = record_example({
        "image": image, "question": b"q", "answer": b"[0.50, 0.50, 1.00, 1.00]",
        "candidates": np.array([b"[0.5, 0.5, 1, 1]", "[0, 0, 0.1, 0.1]".encode()], dtype=object),
        "scores": [1.0, 0.0]})
    assert lists.responses == ["[0.5, 0.5, 1, 1]", "[0, 0, 0.1, 0.1]"]
    np.testing.assert_allclose(lists.box, [0.5, 0.5, 1.0, 1.0])
    assert lists.rewards.dtype == np.float32 and lists.rewards.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="HWC uint8"):
        record_example({"image": image.astype(np.float32), "question": b"q", "answer": b"a"})


def test_official_lists_source_has_train_lists_and_no_val(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "img" / "a.jpg")
    entry = {"image_id": 1, "image_path": "a.jpg",
             "question": "Please provide the bounding box coordinate of the region this "
                         "sentence describes: red thing",
             "answer": "[0.1, 0.2, 0.5, 0.6]", "answers_gen": ["[0.1, 0.2, 0.5, 0.6]", "[0, 0, 1, 1]"],
             "iou_scores": [1.0, 0.16]}
    # indented as the official file is (one-line arrays hit a key collision in PerpoLists)
    (tmp_path / "lists.json").write_text(json.dumps([entry, dict(entry, image_id=2)], indent=2))
    cfg = tiny_cfg(tmp_path / "data", "data.source=official_json",
                   f"data.path={tmp_path / 'lists.json'}", f"data.image_dir={tmp_path / 'img'}")
    data = prepare.prepare_data(cfg, progress=False)
    assert len(data.train) == 2 and data.val is None
    example = record_example(data.train[1])
    assert example.responses == entry["answers_gen"] and example.image.shape == (30, 40, 3)
    np.testing.assert_allclose(example.box, [0.1, 0.2, 0.5, 0.6])
    batch = prompt_batch_for([example], data.processor, None)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)  # resized to the tiny model's input
    missing = tiny_cfg(tmp_path / "data", "data.source=official_json",
                       f"data.path={tmp_path / 'nope.json'}", f"data.image_dir={tmp_path}")
    with pytest.raises(ConfigError, match="data.path"):
        prepare.prepare_data(missing, progress=False)


def test_hf_path_model_and_processor_come_from_the_checkpoint(prepared, tmp_path):
    from perpo_jax.hf import save_pretrained

    cfg, data = prepared
    mesh = assemble.build_mesh(cfg)
    hf_dir = save_pretrained(assemble.build_run_model(cfg, mesh, data.processor), str(tmp_path / "hf"),
                             source_dir=data.processor_dir)
    os.remove(os.path.join(hf_dir, "perpo_processor.json"))  # as a transformers-made dir
    hf_cfg = tiny_cfg(cfg.data.data_dir, f"model.hf_path={hf_dir}", "model.remat=true")
    hf_data = prepare.prepare_data(hf_cfg, progress=False)
    assert hf_data.processor_dir is None
    proc, ref = hf_data.processor, data.processor
    assert proc.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    assert proc.image_token_id == ref.image_token_id and proc.num_image_tokens(32, 32) == 16
    model = assemble.build_run_model(hf_cfg, mesh, proc)
    assert model.config.text.remat and model.language_model.config.remat
    example = record_example(hf_data.val[0])
    np.testing.assert_array_equal(proc(example.image, example.question)["prompt_ids"],
                                  ref(example.image, example.question)["prompt_ids"])
