"""data.source=hf_preference: preference parquet / Arrow / save_to_disk files as users have
them (RLAIF-V pairs, TRL chat messages, responses + scores lists) read into offline lists,
their errors, the content-keyed cache, and offline DPO / PerPO / LiPO training on them."""

import io
import json
import math
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from tiny_run import tiny_cfg

from perpo_jax import cli
from perpo_jax.config import ConfigError, config_to_dict, load_config
from perpo_jax.data import hf_preference, pref_files, prepare
from perpo_jax.data.examples import record_example, text_of
from perpo_jax.data.hf_preference import PreferenceColumns, read_preference_lists
from perpo_jax.data.refcoco_style import DataFileError
from perpo_jax.train.loop import train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# datasets' Image feature as Arrow stores it (a real RLAIF-V parquet's `image` column)
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# the schema of openbmb/RLAIF-V-Dataset's parquet files (its dataset card's features)
RLAIFV_SCHEMA = pa.schema([
    ("ds_name", pa.string()), ("image", IMAGE_STRUCT), ("question", pa.string()),
    ("chosen", pa.string()), ("rejected", pa.string()), ("origin_dataset", pa.string()),
    ("origin_split", pa.string()), ("idx", pa.string()), ("image_path", pa.string()),
])
TEXT_PART = pa.struct([("text", pa.string()), ("type", pa.string())])
MESSAGES = pa.list_(pa.struct([("content", pa.list_(TEXT_PART)), ("role", pa.string())]))


def _pixels(i: int) -> np.ndarray:
    """[12, 16, 3] uint8, different per i."""
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)


def _encoded(i: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(i)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _rlaifv_rows(n: int, *, offset: int = 0) -> list[dict]:
    return [{"ds_name": "RLAIF-V", "image": {"bytes": _encoded(offset + i), "path": f"{i}.jpg"},
             "question": f"<image>\nWhat is in picture {offset + i}?",
             "chosen": f"A cat number {offset + i}.", "rejected": f"A dog number {offset + i}.",
             "origin_dataset": "OK-VQA", "origin_split": '{"model": "x"}', "idx": str(i),
             "image_path": f"images/{i}.jpg"} for i in range(n)]


def _write_rlaifv(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=RLAIFV_SCHEMA), path)
    return str(path)


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _read(files, columns=PreferenceColumns(), image_root=None, **kw):
    return list(read_preference_lists([str(f) for f in files], columns, image_root, **kw))


# ----------------------------------------------------------------------------- layouts


def test_rlaifv_parquet_rows_become_pairs_rewarded_1_0(tmp_path):
    path = _write_rlaifv(tmp_path / "rlaif.parquet", _rlaifv_rows(3))
    assert pq.read_schema(path).field("image").type == IMAGE_STRUCT  # as RLAIF-V's parquet
    lists = _read([path])
    assert [r.row for r in lists] == [0, 1, 2]
    first = lists[0]
    assert first.candidates == ("A cat number 0.", "A dog number 0.")
    np.testing.assert_array_equal(first.scores, np.asarray([1.0, 0.0], np.float32))
    assert first.answer == "A cat number 0."
    assert first.question == "What is in picture 0?"  # the file's <image> is not doubled
    assert first.image == _encoded(0)  # RGB PNG bytes stored as they are
    np.testing.assert_array_equal(_decoded(lists[2].image), _pixels(2))
    assert "datasets" not in sys.modules  # pyarrow reads everything


def test_image_placeholders_leave_the_prompt_only_once_the_processor_adds_it():
    assert hf_preference.without_placeholders("<image>\nDescribe it.") == "Describe it."
    assert hf_preference.without_placeholders("Look at <image> and say") == "Look at and say"
    assert hf_preference.without_placeholders("Q?\n<image>") == "Q?"


@pytest.mark.parametrize("ipc", ["file", "stream"])
def test_arrow_file_with_image_paths_under_image_dir(tmp_path, ipc):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.fromarray(_pixels(0)).save(tmp_path / "img" / "sub" / "a.png")
    Image.fromarray(_pixels(1)).convert("L").save(tmp_path / "img" / "b.png")  # grey
    table = pa.table({"image_path": ["sub/a.png", "b.png"], "prompt": ["q0", "q1"],
                      "chosen": ["yes", "no"], "rejected": ["no", "yes"]})
    path = tmp_path / "pairs.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_file if ipc == "file" else pa.ipc.new_stream
        with writer(sink, table.schema) as w:
            w.write_table(table)
    lists = _read([path], image_root=str(tmp_path / "img"))
    assert [r.question for r in lists] == ["q0", "q1"]
    assert lists[0].image_path == str(tmp_path / "img" / "sub" / "a.png")
    np.testing.assert_array_equal(_decoded(lists[0].image), _pixels(0))
    grey = _decoded(lists[1].image)  # stored as RGB PNG
    assert grey.shape == (12, 16, 3) and (grey[..., 0] == grey[..., 2]).all()
    with pytest.raises(DataFileError, match=r"pairs\.arrow:row 0: .*relative.*data\.image_dir"):
        _read([path])


def _write_stream(path, table):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


def _save_to_disk(folder, tables, split=None):
    """A `datasets.Dataset.save_to_disk` folder as datasets lays it out: one IPC-stream shard
    per table, state.json listing them, dataset_info.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(tables):05d}.arrow" for i in range(len(tables))]
    for name, table in zip(names, tables):
        _write_stream(folder / name, table)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0123abcd",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": split}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"citation": "", "description": "", "features": {
        "image": {"_type": "Image"}, "question": {"dtype": "string", "_type": "Value"},
        "chosen": {"dtype": "string", "_type": "Value"},
        "rejected": {"dtype": "string", "_type": "Value"}}, "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


def _pair_table(rows):
    return pa.Table.from_pylist(
        [{"image": {"bytes": _encoded(i), "path": None}, "question": q, "chosen": c,
          "rejected": r} for i, (q, c, r) in enumerate(rows)],
        schema=pa.schema([("image", IMAGE_STRUCT), ("question", pa.string()),
                          ("chosen", pa.string()), ("rejected", pa.string())]))


def test_save_to_disk_dataset_and_dataset_dict_folders(tmp_path):
    shards = [_pair_table([("a", "c1", "r1")]), _pair_table([("b", "c2", "r2"), ("c", "c3", "r3")])]
    _save_to_disk(tmp_path / "ds", shards)
    files = pref_files.resolve_files(str(tmp_path / "ds"))
    assert [os.path.basename(f) for f in files] == ["data-00000-of-00002.arrow",
                                                    "data-00001-of-00002.arrow"]
    assert [r.question for r in _read(files)] == ["a", "b", "c"]

    _save_to_disk(tmp_path / "dd" / "train", [_pair_table([("t", "c", "r")])], split="train")
    _save_to_disk(tmp_path / "dd" / "test", [_pair_table([("e", "c", "r")])], split="test")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    default = pref_files.resolve_files(str(tmp_path / "dd"))
    assert [r.question for r in _read(default)] == ["t"]
    test = pref_files.resolve_files(str(tmp_path / "dd"), "test")
    assert [r.question for r in _read(test)] == ["e"]
    with pytest.raises(ConfigError, match=r"data\.pref_split: 'val' .*splits: train, test"):
        pref_files.resolve_files(str(tmp_path / "dd"), "val")


def test_globs_and_folders_of_parquet_shards(tmp_path):
    (tmp_path / "data").mkdir()
    for split, n in (("train", 2), ("test", 1)):
        for i in range(n):
            _write_rlaifv(tmp_path / "data" / f"{split}-{i:05d}-of-{n:05d}.parquet",
                          _rlaifv_rows(1, offset=10 * i))
    every = pref_files.resolve_files(str(tmp_path / "data"))
    assert len(every) == 3
    train = pref_files.resolve_files(str(tmp_path / "data"), "train")
    assert [os.path.basename(f) for f in train] == ["train-00000-of-00002.parquet",
                                                    "train-00001-of-00002.parquet"]
    assert pref_files.resolve_files(str(tmp_path / "data" / "train-*.parquet")) == train
    with pytest.raises(ConfigError, match=r"data\.path: no \.parquet / \.arrow file matches"):
        pref_files.resolve_files(str(tmp_path / "data" / "val-*.parquet"))
    with pytest.raises(ConfigError, match=r"data\.path: .* does not exist"):
        pref_files.resolve_files(str(tmp_path / "nothing.parquet"))


def test_list_with_scores_layout_keeps_the_given_scores(tmp_path):
    table = pa.table({
        "image": pa.array([{"bytes": _encoded(0, "JPEG"), "path": None}], IMAGE_STRUCT),
        "prompt": ["Describe."],
        "responses": pa.array([["good", "ok", "bad"]], pa.list_(pa.string())),
        "scores": pa.array([[0.25, 0.875, -1.5]], pa.list_(pa.float64())),
    })
    pq.write_table(table, tmp_path / "lists.parquet")
    (r,) = _read([tmp_path / "lists.parquet"])
    assert r.candidates == ("good", "ok", "bad") and r.answer == "ok"  # the best-scored one
    np.testing.assert_array_equal(r.scores, np.asarray([0.25, 0.875, -1.5], np.float32))
    assert r.image == _encoded(0, "JPEG")


def _message(role, *parts):
    return {"role": role, "content": [
        {"text": None, "type": "image"} if p is None else {"text": p, "type": "text"}
        for p in parts]}


def test_chat_messages_prompts_and_answers(tmp_path):
    """TRL's conversational preference layout (trl-lib/rlaif-v): images list, prompt /
    chosen / rejected as message lists with content parts."""
    table = pa.table({
        "images": pa.array([[{"bytes": _encoded(0), "path": None}]], pa.list_(IMAGE_STRUCT)),
        "prompt": pa.array([[_message("user", None, "What is shown?")]], MESSAGES),
        "chosen": pa.array([[_message("assistant", "A red square.")]], MESSAGES),
        "rejected": pa.array([[_message("assistant", "A blue circle.")]], MESSAGES),
    })
    pq.write_table(table, tmp_path / "trl.parquet")
    (r,) = _read([tmp_path / "trl.parquet"])
    assert r.question == "What is shown?"
    assert r.candidates == ("A red square.", "A blue circle.")
    # LLaVA conversations: the trailing gpt turn is the answer, not the prompt
    llava = [{"from": "human", "value": "<image>\nCount them."}, {"from": "gpt", "value": "3"}]
    assert hf_preference.prompt_cell(llava, "conversations") == "Count them."
    two_users = [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]
    assert hf_preference.prompt_cell(two_users, "messages") == "first\nsecond"
    with pytest.raises(DataFileError, match="system turn before the answer"):
        hf_preference.prompt_cell([{"role": "system", "content": "Be brief."}] + two_users, "m")
    assert hf_preference.response_cell(llava, "chosen") == "3"


# ----------------------------------------------------------------------------- errors


def test_missing_columns_name_the_file_its_columns_and_the_key(tmp_path):
    pq.write_table(pa.table({"picture": [b"x"], "question": ["q"], "chosen": ["a"],
                             "rejected": ["b"]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"data\.pref_image_column: .*a\.parquet has none of "
                                          r"the columns image, images.*its columns: picture, "
                                          r"question, chosen, rejected"):
        _read([tmp_path / "a.parquet"])
    with pytest.raises(DataFileError, match=r"a\.parquet:row 0: image cannot be decoded"):
        _read([tmp_path / "a.parquet"], PreferenceColumns(image="picture"))  # b"x": no image
    pq.write_table(pa.table({"image": [_encoded(0)], "question": ["q"], "good": ["a"],
                             "rejected": ["b"]}), tmp_path / "b.parquet")
    with pytest.raises(ConfigError, match=r"data\.pref_chosen_column: .*b\.parquet has neither "
                                          r"the pair columns 'chosen' \+ 'rejected'.*its "
                                          r"columns: image, question, good, rejected"):
        _read([tmp_path / "b.parquet"])
    (r,) = _read([tmp_path / "b.parquet"], PreferenceColumns(chosen="good"))
    assert r.candidates == ("a", "b")
    with pytest.raises(ConfigError, match=r"data\.pref_prompt_column: .*no column 'query'"):
        _read([tmp_path / "b.parquet"], PreferenceColumns(prompt="query", chosen="good"))


def _bad_rows_file(tmp_path) -> str:
    """Six list-layout rows; rows 1-4 are bad in four different ways."""
    good = _encoded(0)
    rows = [
        (good, "q0", ["a", "b"], [1.0, 0.0]),
        (good[: len(good) // 2], "q1", ["a", "b"], [1.0, 0.0]),  # truncated image
        (good, "q2", ["a", "  "], [1.0, 0.0]),                  # empty response
        (good, "q3", ["a", "b"], [math.nan, 0.0]),              # NaN score
        (good, None, ["a", "b"], [1.0, 0.0]),                   # wrong type (null prompt)
        (good, "q5", ["a", "b"], [0.5, 0.0]),
    ]
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": None} for b, *_ in rows], IMAGE_STRUCT),
        "question": [q for _, q, *_ in rows],
        "responses": pa.array([r for *_, r, _ in rows], pa.list_(pa.string())),
        "scores": pa.array([s for *_, s in rows], pa.list_(pa.float32())),
    })
    path = str(tmp_path / "bad.parquet")
    pq.write_table(table, path)
    return path


def test_bad_rows_raise_naming_file_and_row_or_are_skipped_and_counted(tmp_path):
    path = _bad_rows_file(tmp_path)
    with pytest.raises(DataFileError, match=r"bad\.parquet:row 1: image cannot be decoded"):
        _read([path])
    skipped = []
    lists = _read([path], skip_invalid=True, skipped=skipped)
    assert [r.question for r in lists] == ["q0", "q5"]
    assert [(s.line, s.reason.split(" ")[0]) for s in skipped] == [
        (1, "image"), (2, "'responses[1]'"), (3, "'scores'[0]"), (4, "'question'")]
    assert "is empty" in skipped[1].reason and "nan" in skipped[2].reason
    assert "NoneType" in skipped[3].reason

    cfg = tiny_cfg(tmp_path, "data.source=hf_preference", f"data.path={path}",
                   "train.mode=offline", "data.skip_invalid=true")
    data = prepare.prepare_data(cfg, progress=False)
    assert len(data.train) == 2 and [s.line for s in data.skipped] == [1, 2, 3, 4]
    again = prepare.prepare_data(cfg, progress=False)  # reused: still says what was left out
    assert not again.built and [s.line for s in again.skipped] == [1, 2, 3, 4]


def test_unreadable_file_is_one_error_naming_it(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match=r"junk\.parquet: cannot be read as parquet"):
        _read([tmp_path / "junk.parquet"], skip_invalid=True)


# ----------------------------------------------------------------------------- config + cache


def test_config_keys_are_validated_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.mode: .*hf_preference.*train\.mode=offline"):
        tiny_cfg(tmp_path, "data.source=hf_preference", "data.path=x.parquet")
    with pytest.raises(ConfigError, match=r"data\.path: required"):
        tiny_cfg(tmp_path, "data.source=hf_preference", "train.mode=offline")
    with pytest.raises(ConfigError, match=r"data\.pref_rejected_column: the same column"):
        tiny_cfg(tmp_path, "data.source=hf_preference", "data.path=x.parquet",
                 "train.mode=offline", "data.pref_rejected_column=chosen")
    with pytest.raises(ConfigError, match=r"data\.pref_prompt_column: empty"):
        tiny_cfg(tmp_path, "data.source=hf_preference", "data.path=x.parquet",
                 "train.mode=offline", "data.pref_prompt_column=' '")
    with pytest.raises(ConfigError, match=r"data\.path: .*missing\.parquet does not exist"):
        prepare.prepare_data(tiny_cfg(tmp_path, "data.source=hf_preference", "train.mode=offline",
                                      f"data.path={tmp_path / 'missing.parquet'}"), progress=False)


def test_shipped_rlaifv_config_loads_over_the_official_recipe():
    cfg = load_config(os.path.join(CONFIGS, "llava15_7b_rlaifv_dpo.yaml"))
    assert (cfg.data.source, cfg.train.mode, cfg.loss.name) == ("hf_preference", "offline", "dpo")
    assert cfg.train.num_candidates == 2 and cfg.lora.rank == 128  # pairs; the official LoRA
    perpo = load_config(os.path.join(CONFIGS, "llava15_7b_rlaifv_dpo.yaml"), ["loss.name=perpo"])
    assert perpo.loss.gamma == 0.5


def test_dataset_cache_is_keyed_on_file_content_and_columns(tmp_path):
    path = _write_rlaifv(tmp_path / "rlaif.parquet", _rlaifv_rows(2))
    overrides = ("data.source=hf_preference", f"data.path={path}", "train.mode=offline")
    first = prepare.prepare_data(tiny_cfg(tmp_path, *overrides), progress=False)
    assert first.built and "first build" in first.cache_reason
    same = prepare.prepare_data(tiny_cfg(tmp_path, *overrides), progress=False)
    assert not same.built and "reused" in same.cache_reason
    _write_rlaifv(path, _rlaifv_rows(2, offset=5))  # the same file name, new content
    edited = prepare.prepare_data(tiny_cfg(tmp_path, *overrides), progress=False)
    assert edited.built and "changed since rlaif_" in edited.cache_reason
    questions = sorted(text_of(edited.train_text[i]["question"]) for i in range(2))
    assert questions == ["What is in picture 5?", "What is in picture 6?"]
    swap = ("data.pref_chosen_column=rejected", "data.pref_rejected_column=chosen")
    swapped = prepare.prepare_data(tiny_cfg(tmp_path, *overrides, *swap), progress=False)
    assert swapped.built
    example = record_example(swapped.train[0])
    assert example.responses[0].startswith("A dog") and example.rewards.tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- training


def _train_file(tmp_path, n=8) -> str:
    (tmp_path / "data").mkdir(exist_ok=True)
    return _write_rlaifv(tmp_path / "data" / "train-00000-of-00001.parquet", _rlaifv_rows(n))


def _round_lists(out_dir):
    with np.load(os.path.join(out_dir, "lists", "host000", "round_00000.npz")) as z:
        return {k: z[k] for k in ("rewards", "list_mask", "response_mask")}


def _scored_arrow(tmp_path, n=8) -> list[str]:
    """A list-layout Arrow stream file (3 scored responses per row), images by path."""
    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.fromarray(_pixels(i)).save(tmp_path / "img" / f"{i}.png")
    table = pa.table({
        "image": [f"{i}.png" for i in range(n)],
        "prompt": [f"<image>\nDescribe picture {i}." for i in range(n)],
        "responses": pa.array([[f"bad {i}", f"best {i}", f"mid {i}"] for i in range(n)],
                              pa.list_(pa.string())),
        "scores": pa.array([[0.1, 0.9, 0.5]] * n, pa.list_(pa.float32())),
    })
    _write_stream(tmp_path / "scored.arrow", table)
    return [f"data.path={tmp_path / 'scored.arrow'}", f"data.image_dir={tmp_path / 'img'}"]


# the candidates each list holds, sorted by reward and padded to train.num_candidates = 4
ROUND_REWARDS = {"pairs": [1.0, 0.0, 0.0, 0.0], "lists": [0.9, 0.5, 0.1, 0.0]}


@pytest.mark.parametrize("loss,layout", [("perpo", "pairs"), ("lipo", "lists")])
def test_offline_perpo_and_lipo_train_on_pairs_and_scored_lists(tmp_path, loss, layout):
    data = [f"data.path={_train_file(tmp_path)}"] if layout == "pairs" else _scored_arrow(tmp_path)
    cfg = tiny_cfg(tmp_path, "data.source=hf_preference", *data, "train.mode=offline",
                   "train.steps=0", "train.epochs=1", f"loss.name={loss}")
    result = train(cfg, progress=False)
    assert result.steps == 1 and result.history[0]["num_valid_lists"] == 8
    # policy == reference at the first update: every log-ratio gap is 0, so a list's loss is
    # -log sigmoid(0) = log 2 (the pair weights of perpo and lipo sum to 1)
    np.testing.assert_allclose(result.history[0]["loss"], math.log(2.0), rtol=1e-5)
    lists = _round_lists(cfg.train.out_dir)
    want = np.asarray(ROUND_REWARDS[layout], np.float32)
    np.testing.assert_allclose(lists["rewards"], np.tile(want, (8, 1)), rtol=1e-6)
    real = 2 if layout == "pairs" else 3  # then masked padding
    np.testing.assert_array_equal(lists["list_mask"], np.tile(np.arange(4) < real, (8, 1)))
    assert lists["response_mask"][:, :real].any(-1).all()
    assert not lists["response_mask"][:, real:].any()


def test_one_command_trains_offline_dpo_on_a_glob_of_rlaifv_parquet(tmp_path, capsys):
    _train_file(tmp_path, n=16)
    base = tiny_cfg(tmp_path)  # the tiny run's settings, as a config file
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(base)))
    args = ["train", "--config", str(config), "data.source=hf_preference",
            f"data.path={tmp_path / 'data' / '*.parquet'}", "train.mode=offline",
            "loss.name=dpo", "train.steps=0", "train.epochs=1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "offline: 16 of 16 lists kept" in out and "trained 2 steps" in out
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in rows if r["kind"] == "step"]
    np.testing.assert_allclose(steps[0]["loss"], math.log(2.0), rtol=1e-5)
    assert math.isfinite(steps[1]["loss"]) and steps[1]["loss"] != steps[0]["loss"]
