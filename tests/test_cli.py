"""`perpo-jax` CLI end to end on a tiny config (in-process `cli.main`)."""
import argparse
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import yaml

from perpo_jax import cli, cli_paths
from perpo_jax.atomic import current_umask

CLI_SCRIPT = os.path.join(os.path.dirname(sys.executable), "perpo-jax")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = {
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1}},
        "lora": {"enabled": False},
        "train": {"seed": 0, "out_dir": str(root / "run")},
        "data": {"data_dir": str(root / "data"), "num_train": 16, "num_val": 8,
                 "image_size": 32},
        "sampling": {"num_samples": 2, "max_new_tokens": 6, "temperature": 1.0},
        "eval": {"num_examples": 4, "batch_size": 4, "max_new_tokens": 6, "num_images": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["prepare-data", "--config", str(path)]) == 0
    return root, str(path)


def test_help_is_fast_and_lists_commands():
    probe = ("import sys, perpo_jax.cli; "
             "print(sorted(m for m in ('jax', 'transformers', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # heavy modules are imported inside the subcommands
    help_text = subprocess.run([CLI_SCRIPT, "--help"], capture_output=True, text=True, check=True)
    for command in ("prepare-data", "sample", "eval", "convert", "export", "train", "demo"):
        assert command in help_text.stdout


def test_every_argument_has_help_and_train_help_says_modes_and_outputs():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.dest} has no help"
    train = sub.choices["train"].format_help()
    for needle in ("online", "offline", "train.out_dir", "checkpoints/", "metrics.jsonl", "tb/"):
        assert needle in train
    assert "official_json" in sub.choices["eval"].format_help()  # no val split there


def test_config_paths_are_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [f"{key}=rel/{key}" for key in cli_paths.PATH_KEYS]
    cfg = cli._load(argparse.Namespace(config=None, overrides=overrides))
    for key in cli_paths.PATH_KEYS:
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == str(tmp_path / "rel" / key)


@pytest.mark.parametrize("argv", [
    ["sample", "--checkpoint", "nope"],
    ["eval", "--checkpoint", "nope", "--out", "eval"],
    ["export", "--checkpoint", "nope", "--out", "hf"],
    ["convert", "--to-hf", "--checkpoint", "nope", "--out", "hf"],
    ["eval", "--checkpoint", "empty", "--out", "eval"],  # exists, holds no checkpoint
])
def test_bad_checkpoint_is_one_line_before_any_work(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert cli.main(argv + ["data.data_dir=data"]) == 1
    err = capsys.readouterr().err
    checkpoint = argv[argv.index("--checkpoint") + 1]
    assert err.count("\n") == 1 and str(tmp_path / checkpoint) in err
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no dataset, no checkpoint dir, no out


@pytest.mark.parametrize("argv, key", [
    (["eval", "--out", "x", "eval.nope=1"], "eval.nope"),
    (["prepare-data", "data.num_train=many"], "data.num_train"),
    (["sample", "data.source=imagenet"], "data.source"),
    (["prepare-data", "--config", "/does/not/exist.yaml"], "config file not found"),
])
def test_config_errors_exit_2_naming_the_key(argv, key, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_prepare_data_reports_counts(tiny_config, capsys):
    root, config = tiny_config
    assert cli.main(["prepare-data", "--config", config]) == 0  # reuses the prepared data
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train"], summary["val"]) == (16, 8)
    assert summary["data_dir"] == str(root / "data") and summary["tokenizer_size"] > 261
    assert summary["dataset"] == "reused" and "same settings" in summary["dataset_reason"]


def test_prepare_data_shows_no_tfds_bars_but_its_summary(tmp_path, capsys):
    """A first build: TFDS' "Generating splits... / Shuffling" bars are off while
    prepare-data builds (and TFDS' setting is back after), the JSON summary still printed."""
    from tensorflow_datasets.core.utils import tqdm_utils

    shown = tqdm_utils._active
    argv = ["prepare-data", f"data.data_dir={tmp_path / 'data'}", "data.num_train=8",
            "data.num_val=4", "data.image_size=32"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["dataset"] == "built" and (summary["train"], summary["val"]) == (8, 4)
    for bar in ("Generating splits", "Generating train examples", "Shuffling"):
        assert bar not in err and bar not in out, err[-2000:]
    assert tqdm_utils._active == shown


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_prompt_too_long_names_the_key_to_raise(tiny_config, command, capsys):
    root, config = tiny_config
    new_tokens = {"eval": "eval.max_new_tokens = 24 - 6",
                  "sample": "sampling.max_new_tokens = 24 - 6"}
    argv = [command, "--config", config, "train.max_length=24"]
    assert cli.main(argv + (["--out", str(root / "long")] if command == "eval" else [])) == 1
    err = capsys.readouterr().err
    assert f"train.max_length - {new_tokens[command]} = 18: raise train.max_length" in err


def test_eval_writes_report_and_png(tiny_config, capsys):
    root, config = tiny_config
    out = root / "eval"
    assert cli.main(["eval", "--config", config, "--out", str(out), "eval.batch_size=3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "grounding" and len(report["predictions"]) == 4
    assert {"acc@0.5", "mean_iou", "samples_per_s"} <= set(report["metrics"])
    assert report["metrics"]["count"] == 4 and report["metrics"]["samples_per_s"] > 0
    assert (out / "boxes.png").stat().st_size > 0


def test_sample_writes_rewarded_candidates(tiny_config):
    from perpo_jax.rewards import iou_rewards

    root, config = tiny_config
    out = root / "samples.jsonl"
    assert cli.main(["sample", "--config", config, "--num-prompts", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["candidates"]) == 2 and len(row["rewards"]) == 2
        gt = np.array(json.loads(row["answer"]), np.float32)[None].repeat(2, 0)
        np.testing.assert_allclose(row["rewards"], iou_rewards(row["candidates"], gt), atol=1e-6)


def _safetensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_convert_round_trip(tiny_config):
    from perpo_jax.assemble import build_mesh, build_run_model
    from perpo_jax.data.prepare import prepare_data
    from perpo_jax.config import load_config
    from perpo_jax.hf import save_pretrained

    root, config = tiny_config
    cfg = load_config(config, ["train.seed=7"])
    data = prepare_data(cfg, progress=False)
    hf_in = save_pretrained(build_run_model(cfg, build_mesh(cfg), data.processor), str(root / "hf_in"),
                            source_dir=data.processor_dir)
    ckpt, hf_out = str(root / "ckpt"), str(root / "hf_out")
    assert cli.main(["convert", "--config", config, "--from-hf", hf_in, "--out", ckpt]) == 0
    assert cli.main(["convert", "--to-hf", "--checkpoint", ckpt, "--out", hf_out]) == 0
    before, after = _safetensors(hf_in), _safetensors(hf_out)
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert os.path.exists(os.path.join(hf_out, "perpo_processor.json"))  # processor travels along
    # the converted checkpoint also serves `sample`
    samples = root / "from_ckpt.jsonl"
    assert cli.main(["sample", "--config", config, "--checkpoint", ckpt, "--num-prompts", "1",
                     "--out", str(samples)]) == 0
    assert len(samples.read_text().splitlines()) == 1


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """cwd: run/ holding a (fake) checkpoint, data/ and base/ (model.hf_path), each with a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints" / "5" / "train_state").mkdir(parents=True)
    for name in ("run", "data", "base", "other"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "keep.txt").write_text("x")
    cfg = {"train": {"out_dir": "run"}, "data": {"data_dir": "data"}, "model": {"hf_path": "base"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


@pytest.mark.parametrize("argv, needle", [
    (["export", "--checkpoint", "run/checkpoints", "--out", "run"], "contains the checkpoint"),
    (["export", "--checkpoint", "run/checkpoints", "--out", "run/checkpoints"],
     "is the checkpoint"),
    (["export", "--checkpoint", "run/checkpoints", "--out", "run/checkpoints/hf"],
     "lies inside the checkpoint"),
    (["export", "--checkpoint", "run/checkpoints/5", "--out", "run/tb"],
     "is the run's tb (train.out_dir)"),  # a fresh dir inside the run is fine (test_hostile)
    (["export", "--checkpoint", "run/checkpoints", "--out", "data"], "is the data dir"),
    (["export", "--checkpoint", "run/checkpoints", "--out", "base"], "is the base model"),
    (["convert", "--to-hf", "--checkpoint", "run/checkpoints", "--out", "data/hf"],
     "lies inside the data dir (data.data_dir)"),
    (["convert", "--from-hf", "base", "--out", "base/ckpt"],
     "lies inside the source model (--from-hf)"),
])
def test_out_never_destroys_inputs_even_with_overwrite(fake_run, argv, needle, capsys):
    assert cli.main(argv + ["--config", "c.yaml", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert needle in err and "refused even with --overwrite" in err
    for name in ("run", "data", "base"):
        assert (fake_run / name / "keep.txt").exists()
    assert (fake_run / "run" / "checkpoints" / "5" / "train_state").is_dir()


@pytest.mark.parametrize("command", [["export"], ["convert", "--to-hf"]])
def test_non_empty_out_needs_overwrite(fake_run, command, capsys):
    argv = command + ["--checkpoint", "run/checkpoints", "--out", "other", "--config", "c.yaml"]
    assert cli.main(argv) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert (fake_run / "other" / "keep.txt").exists()


def test_export_merges_lora_of_a_training_checkpoint(tiny_config, capsys, monkeypatch):
    import jax
    import optax
    from flax import nnx

    from perpo_jax.assemble import build_mesh, build_run_model
    from perpo_jax.data.prepare import prepare_data
    from perpo_jax.checkpoint import Checkpointer
    from perpo_jax.config import config_to_dict, load_config
    from perpo_jax.hf import load_pretrained
    from perpo_jax.models.lora import LoRAParam, apply_lora, merge_lora, trainable_filter
    from perpo_jax.train.state import init_train_state

    root, config = tiny_config
    cfg = load_config(config, ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"])
    data = prepare_data(cfg, progress=False)
    model = build_run_model(cfg, build_mesh(cfg), data.processor)
    apply_lora(model, cfg.lora, nnx.Rngs(3))
    lora = nnx.state(model, LoRAParam)  # B is zero at init: make the update visible
    keys = iter(jax.random.split(jax.random.key(1), 100))
    nnx.update(model, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), lora))
    params = nnx.state(model, trainable_filter(cfg.lora))
    ckpt_dir = root / "train_ckpt"
    with Checkpointer(ckpt_dir, save_every=1, async_save=False,
                      metadata=config_to_dict(cfg)) as ckpt:
        ckpt.maybe_save(5, init_train_state(params, optax.sgd(0.1), 0), {"epoch": 0})

    plain = str(root / "hf_plain")
    assert cli.main(["convert", "--to-hf", "--checkpoint", str(ckpt_dir), "--out", plain]) == 1
    assert "perpo-jax export" in capsys.readouterr().err and not os.path.exists(plain)

    q_proj = ("language_model", "layers", "self_attn", "q_proj", "kernel")  # stacked [L, ...]
    base_q = np.asarray(dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[q_proj].get_value())
    hf = str(root / "hf_export")
    os.makedirs(hf)
    (root / "hf_export" / "stale.txt").write_text("x")
    monkeypatch.chdir(root)  # relative paths, as the README writes them; config from metadata
    assert cli.main(["export", "--checkpoint", "train_ckpt", "--out", "hf_export"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", "train_ckpt", "--out", "hf_export",
                     "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(hf, "stale.txt"))
    umask = current_umask()  # shared files, not tempfile's private 0700 / 0600
    assert stat.S_IMODE(os.stat(hf).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(os.path.join(hf, "model.safetensors")).st_mode) == 0o666 & ~umask
    want = nnx.state(merge_lora(model), nnx.Param)
    got = nnx.state(load_pretrained(hf), nnx.Param)
    flat_want, flat_got = dict(nnx.to_flat_state(want)), dict(nnx.to_flat_state(got))
    assert sorted(flat_want) == sorted(flat_got)
    for path, var in flat_want.items():
        np.testing.assert_allclose(np.asarray(flat_got[path].get_value()),
                                   np.asarray(var.get_value()), rtol=1e-6, atol=1e-6,
                                   err_msg=str(path))
    assert not np.allclose(np.asarray(flat_got[q_proj].get_value()), base_q)  # LoRA was merged


def test_demo_table_keeps_training_and_eval_rates_apart(capsys):
    from perpo_jax.demo.run import _print_table

    _print_table({"sft_warmup": {"metrics": {"acc@0.5": 0.1, "samples_per_s": 67.0}},
                  "perpo": {"metrics": {"acc@0.5": 0.2, "samples_per_s": 66.0},
                            "samples_per_s": 901.0}})
    head, _, sft, perpo = capsys.readouterr().out.splitlines()[:4]
    assert head.split()[-4:] == ["train", "samples/s", "eval", "ex/s"]
    assert sft.split()[-2:] == ["-", "67.0"] and perpo.split()[-2:] == ["901.0", "66.0"]
