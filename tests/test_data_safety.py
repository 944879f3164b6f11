"""Nothing stale, nothing lost, nothing noisy: the dataset cache is keyed on content, files land
with the umask's modes, one TensorBoard file per run, official_json's missing val split."""
import json
import logging
import os
import stat

import numpy as np
import pytest
import yaml
from PIL import Image

from perpo_jax import cli
from perpo_jax.atomic import atomic_dir, atomic_file
from perpo_jax.data.examples import default_split
from perpo_jax.train.run_log import RunLog


def _entry(question: str, image: str = "a.png") -> dict:
    return {"image_id": 1, "image_path": image, "question": question,
            "answer": "[0.1, 0.1, 0.5, 0.5]",
            "answers_gen": ["[0.1, 0.1, 0.5, 0.5]", "[0.6, 0.6, 0.9, 0.9]"],
            "iou_scores": [1.0, 0.0]}


def _official_lists(root, entries) -> str:
    """An official_json lists file + its image under `root`; returns the config path."""
    (root / "img").mkdir(exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "img" / "a.png")
    (root / "lists.json").write_text(json.dumps(entries))
    cfg = {"model": {"tiny": {"hidden_size": 32, "num_layers": 1}},
           "data": {"source": "official_json", "path": str(root / "lists.json"),
                    "image_dir": str(root / "img"), "data_dir": str(root / "data"),
                    "image_size": 32},
           "train": {"out_dir": str(root / "run")}}
    path = root / "lists.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _prepare(config, capsys, *overrides) -> dict:
    assert cli.main(["prepare-data", "--config", config, *overrides]) == 0
    return json.loads(capsys.readouterr().out)


def test_cache_follows_file_content_and_settings_quietly(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    config = _official_lists(tmp_path, [_entry("where is a?"), _entry("where is b?")])
    first = _prepare(config, capsys)
    assert (first["dataset"], first["train"], first["val"]) == ("built", 2, 0)
    assert "first build" in first["dataset_reason"]
    # TFDS's "Downloading and preparing dataset Unknown size" and absl's custom-config /
    # OpenCV notices are silenced (stdout carries only the JSON summary)
    assert "Using custom data configuration" not in caplog.text and "OpenCV" not in caplog.text

    (tmp_path / "lists.json").write_text(json.dumps([_entry("where is c?")]))  # edited
    edited = _prepare(config, capsys)
    assert (edited["dataset"], edited["train"]) == ("built", 1)
    assert "lists.json (its content)" in edited["dataset_reason"]
    again = _prepare(config, capsys)
    assert again["dataset"] == "reused" and again["dataset_reason"].startswith("reused")

    broken = [_entry("where is c?"), _entry("where is d?", image="missing.png")]
    (tmp_path / "lists.json").write_text(json.dumps(broken))
    skipping = _prepare(config, capsys, "data.skip_invalid=true")
    assert (skipping["dataset"], skipping["train"], skipping["skipped"]) == ("built", 1, 1)
    # the dataset built with skip_invalid=true is not served once it is set back to false
    assert cli.main(["prepare-data", "--config", config, "data.skip_invalid=false"]) == 1
    assert "missing.png" in capsys.readouterr().err


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return _official_lists(tmp_path_factory.mktemp("official"), [_entry("where is a?")])


def test_official_json_has_no_val_split_and_says_so(official, capsys):
    for command in (["eval", "--out", os.path.join(os.path.dirname(official), "eval")],
                    ["sample"]):
        assert cli.main([*command, "--config", official, "--split", "val"]) == 2
        err = capsys.readouterr().err
        assert "'official_json' has no 'val' split" in err and "--split train" in err
    assert not os.path.exists(os.path.join(os.path.dirname(official), "eval"))


def test_default_split_is_the_one_that_exists():
    class Data:
        val = None

    assert default_split(Data()) == "train"
    Data.val = [1]
    assert default_split(Data()) == "val"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_umask_modes(tmp_path, umask_027):
    with atomic_dir(str(tmp_path / "export")) as tmp:
        with open(os.path.join(tmp, "model.safetensors"), "w") as f:
            f.write("x")
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o600)  # as safetensors writes it
    assert _mode(tmp_path / "export") == 0o750  # not tempfile's private 0700
    assert _mode(tmp_path / "export" / "model.safetensors") == 0o640
    with atomic_file(str(tmp_path / "report.json")) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert _mode(tmp_path / "report.json") == 0o640  # not tempfile's 0600
    os.chmod(tmp_path / "report.json", 0o644)
    with atomic_file(str(tmp_path / "report.json")) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert _mode(tmp_path / "report.json") == 0o644  # a replaced file keeps its mode


def test_one_tensorboard_file_per_run_across_invocations(tmp_path):
    RunLog(str(tmp_path)).close()  # an invocation that fails before logging leaves no file
    assert not (tmp_path / "tb").exists()
    first = RunLog(str(tmp_path))
    first.write({"loss": 1.0}, step=1)
    first.write({"loss": 0.5}, step=2)
    resumed = RunLog(str(tmp_path))  # resumes from a checkpoint at step 1
    resumed.truncate_after(1)
    resumed.write({"loss": 0.7, "note": "text"}, step=2)
    assert len(os.listdir(tmp_path / "tb")) == 1
    scalars = [(e.step, v.tag, round(v.simple_value, 3))
               for e in resumed.events.events() for v in e.summary.value]
    assert scalars == [(1, "step/loss", 1.0), (2, "step/loss", 0.7)]
    assert [r["loss"] for r in resumed.records("step")] == [1.0, 0.7]


def test_a_resume_drops_exactly_what_it_logs_again(tmp_path):
    killed = RunLog(str(tmp_path))
    killed.write({"lists_kept": 3}, step=0, kind="round")
    killed.write({"loss": 1.0}, step=1)
    killed.write({"loss": 0.5}, step=2)  # checkpoint 2 closes round 0
    killed.write({"lists_kept": 4}, step=2, kind="round")  # round 1 starts after it
    killed.write({"loss": 0.7}, step=3)  # killed before checkpoint 3
    resumed = RunLog(str(tmp_path))
    resumed.truncate_after(2)  # round 1 is sampled and logged again, then step 3
    assert [(r["kind"], r["step"]) for r in resumed.records()] == [
        ("round", 0), ("step", 1), ("step", 2)]
    assert [(e.step, v.tag) for e in resumed.events.events() for v in e.summary.value] == [
        (0, "round/lists_kept"), (1, "step/loss"), (2, "step/loss")]
    resumed.write({"lists_kept": 4}, step=2, kind="round")
    resumed.write({"loss": 0.7}, step=3)
    RunLog(str(tmp_path)).truncate_after(3)  # a checkpoint inside round 1 keeps its record
    assert [(r["kind"], r["step"]) for r in resumed.records()][-2:] == [("round", 2), ("step", 3)]
