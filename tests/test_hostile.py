"""Hostile and careless inputs (issue 29): never a traceback, never a deleted or mixed-up file.

Each test below failed on main 42ce01c. Data loss first (the --out guard, read-only readers,
the run-dir lock, the demo's --out, reading with fewer devices), then one-line errors (config
ranges, undecodable data, damaged checkpoints, Ctrl-C, full / read-only disks, no update
applied, paths and overrides, `demo --help`), then the plots.
"""
import errno
import glob
import io
import json
import re
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tiny_run import tiny_cfg
from xla_env import xla_flags

from perpo_jax import cli, cli_paths
from perpo_jax.config import ConfigError, config_from_dict, config_to_dict

REPO = Path(__file__).resolve().parents[1]
# Training on the ground truth: no sampler to compile, where the test is not about lists
SFT = ("loss.name=sft", "loss.sft_target=ground_truth")


def _one_line(err: str) -> str:
    """The single stderr line of a refused command (no traceback, nothing else)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _write_yaml(path: Path, cfg) -> str:
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return str(path)


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """cwd tmp/work (a user's unrelated dir with a file); tmp/run holds a (fake) checkpoint,
    tmp/data a data file; c.yaml names them."""
    (tmp_path / "run" / "checkpoints" / "5" / "train_state").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "good.jsonl").write_text('{"keep": 1}\n')
    cfg = {"train": {"out_dir": str(tmp_path / "run")},
           "data": {"data_dir": str(tmp_path / "data" / "cache"),
                    "path": str(tmp_path / "data" / "good.jsonl")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


# ----------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("out, relation", [
    (".", "is the working directory"),
    ("..", "contains the working directory"),
    ("~", "is the home directory"),
])
def test_out_is_never_the_working_dir_or_home(fake_run, monkeypatch, capsys, out, relation):
    (fake_run / "home").mkdir()
    (fake_run / "home" / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(fake_run / "home"))
    argv = ["export", "--checkpoint", str(fake_run / "run" / "checkpoints"), "--out", out,
            "--overwrite", "--config", str(fake_run / "c.yaml")]
    assert cli.main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert relation in line and "refused even with --overwrite" in line
    assert (fake_run / "work" / "thesis.tex").read_text() == "mine"
    assert (fake_run / "home" / ".bashrc").read_text() == "mine"


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--out", "{root}/data/good.jsonl", "--overwrite"], "is the data file (data.path)"),
    (["eval", "--out", "{root}/run/checkpoints", "--overwrite"], "is the checkpoint dir"),
    (["eval", "--out", "{root}/run/checkpoints/5/hf"], "lies inside the checkpoint dir"),
    (["eval", "--out", "{root}/run", "--overwrite"], "is the run dir (train.out_dir)"),
    (["pope", "--pope-dir", "{root}/pope", "--image-dir", "{root}/img", "--out",
      "{root}/run/metrics.jsonl", "--overwrite"], "is the run's metrics.jsonl"),
    (["pope", "--pope-dir", "{root}/pope", "--image-dir", "{root}/img", "--out",
      "{root}/pope/coco_pope_random.json", "--overwrite"], "lies inside the POPE question dir"),
    (["sample", "--out", "{root}/work/thesis.tex"], "exists: pass --overwrite"),
    (["eval", "--out", "{root}/work"], "is the working directory"),
    (["eval", "--out", "{root}/img"], "exists and is not an empty directory (x.png)"),
])
def test_sample_eval_pope_go_through_the_same_guard(fake_run, capsys, argv, needle):
    for name in ("pope", "img"):
        (fake_run / name).mkdir()
    (fake_run / "pope" / "coco_pope_random.json").write_text("{}\n")
    (fake_run / "img" / "x.png").write_bytes(b"png")
    (fake_run / "run" / "metrics.jsonl").write_text("{}\n")
    argv = [a.format(root=fake_run) for a in argv] + ["--config", str(fake_run / "c.yaml")]
    assert cli.main(argv) == 1
    assert needle in _one_line(capsys.readouterr().err)
    assert (fake_run / "data" / "good.jsonl").read_text() == '{"keep": 1}\n'
    assert (fake_run / "work" / "thesis.tex").read_text() == "mine"
    assert not (fake_run / "data" / "cache").exists()  # refused before any work


def test_a_fresh_dir_inside_a_run_is_fine_its_own_files_are_not(fake_run):
    """Issue 28: export --out runs/x/hf_export (where the demo puts perpo_hf/) is allowed."""
    from perpo_jax.config import load_config

    cfg = cli_paths.resolve_paths(load_config(str(fake_run / "c.yaml")))
    guarded = cli_paths.protected_paths(cfg, checkpoint=str(fake_run / "run" / "checkpoints"))
    cli_paths.check_out_dir(str(fake_run / "run" / "hf_export"), guarded, overwrite=False)
    for inside in ("checkpoints/5/hf", "lists", "tb/x", "metrics.jsonl"):
        with pytest.raises(cli_paths.OutDirError, match="refused even with --overwrite"):
            cli_paths.check_out_dir(str(fake_run / "run" / inside), guarded, overwrite=True)


def _toy_checkpoint(root, steps=(3, 4, 5)):
    import jax.numpy as jnp

    from perpo_jax.checkpoint import Checkpointer

    with Checkpointer(root, save_every=1, async_save=False, metadata={"run": 1}) as ckpt:
        for s in steps:
            ckpt.maybe_save(s, {"w": jnp.full((4,), float(s)), "b": jnp.full((8, 8), float(s))},
                            {"next": s})


def test_readers_open_checkpoints_read_only(tmp_path):
    """Reading a run (eval / export / sample) never removes a save in flight, nor creates."""
    from perpo_jax.checkpoint import Checkpointer
    from perpo_jax.restore import _train_state_dir
    from perpo_jax.export import saved_config

    root = tmp_path / "checkpoints"
    _toy_checkpoint(root)
    in_flight = root / "6.orbax-checkpoint-tmp-1234"
    shutil.copytree(root / "5", in_flight)
    (in_flight / "commit_success.txt").unlink(missing_ok=True)
    assert saved_config(str(root)) == {"run": 1}
    assert _train_state_dir(str(root)) == str(root / "5" / "train_state")
    assert in_flight.is_dir()
    with Checkpointer(tmp_path / "absent", save_every=1, read_only=True):
        pass
    assert not (tmp_path / "absent").exists()


def test_a_second_train_into_a_run_dir_is_refused(tmp_path, capsys):
    from perpo_jax.train.run_lock import RunLock

    run = tmp_path / "run"
    cfg = _write_yaml(tmp_path / "t.yaml", tiny_cfg(tmp_path))
    with RunLock(str(run)):  # a live run holds it (another open file: flock says busy)
        assert cli.main(["train", "--config", cfg]) == 1
        line = _one_line(capsys.readouterr().err)
    assert f"is in use by pid {os.getpid()}" in line
    assert sorted(os.listdir(tmp_path)) == ["run", "t.yaml"]  # no dataset built
    assert os.listdir(run) == []  # lock released and removed; nothing else written

    (run / "run.lock").write_text("pid 999999 on gone-host\n")  # left by a killed run
    with RunLock(str(run)) as lock:
        assert lock.stale_pid == "pid 999999 on gone-host"
        assert (run / "run.lock").read_text().startswith(f"pid {os.getpid()} ")
    assert not (run / "run.lock").exists()


def test_demo_out_must_be_empty_but_for_its_dataset(tmp_path, capsys):
    from perpo_jax.demo import run as demo
    from perpo_jax.demo.args import parse_args

    out = tmp_path / "demo"
    (out / "data" / "shapes").mkdir(parents=True)  # data.data_dir: a cache, reused
    (out / "data" / "shapes" / "x.array_record").write_text("cache")
    (out / "report.json").write_text("{}")  # an earlier run (grounding, then --task ocr...)
    (out / "perpo" / "checkpoints").mkdir(parents=True)
    argv = ["--out", str(out), f"data.data_dir={out / 'data'}", "demo.base_path=null"]
    assert cli.main(["demo", *argv]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "report.json" in line and "pass --overwrite" in line
    assert (out / "report.json").exists()
    cfg = demo.demo_config(parse_args([*argv, "--overwrite"]))
    demo._claim_out(cfg, None, overwrite=True)
    assert sorted(os.listdir(out)) == ["data"]
    assert (out / "data" / "shapes" / "x.array_record").read_text() == "cache"
    demo._claim_out(cfg, None, overwrite=False)  # now empty but for the data: fine


@pytest.fixture(scope="module")
def trained(shared, tmp_path_factory):
    """A training checkpoint (steps 1, 2, 3; all params trainable) whose saved config asks
    for mesh.shape [4, 4, 1]: 16 devices, more than the test process's 8."""
    import optax
    from flax import nnx

    from perpo_jax.checkpoint import Checkpointer
    from perpo_jax.assemble import build_mesh, build_run_model
    from perpo_jax.models.lora import trainable_filter
    from perpo_jax.train.state import init_train_state

    _, data = shared
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(root, f"data.data_dir={data.data_dir}")
    model = build_run_model(cfg, build_mesh(cfg), data.processor)
    params = nnx.state(model, trainable_filter(cfg.lora))
    saved = config_to_dict(cfg)
    saved["mesh"]["shape"] = [4, 4, 1]
    with Checkpointer(root / "checkpoints", save_every=1, async_save=False,
                      metadata=saved) as ckpt:
        for step in (1, 2, 3):
            ckpt.maybe_save(step, init_train_state(params, optax.sgd(0.1), 0), {"epoch": 0})
    return root


def test_export_reads_a_checkpoint_with_the_local_devices(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", str(trained / "checkpoints"), "--out",
                     str(out)]) == 0
    captured = capsys.readouterr()
    assert "reading with mesh.shape=[1, -1, 1]" in captured.err
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# ----------------------------------------------------------------------------- one line


@pytest.mark.parametrize("override, key", [
    ("sampling.num_samples=1", "sampling.num_samples"),
    ("train.num_candidates=1", "train.num_candidates"),
    ("sampling.prompts_per_round=0", "sampling.prompts_per_round"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("loss.beta=0", "loss.beta"),
    ("loss.beta=-0.1", "loss.beta"),
    ("loss.gamma=-0.5", "loss.gamma"),
    ("optim.grad_clip=0", "optim.grad_clip"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.weight_decay=-0.01", "optim.weight_decay"),
    ("data.min_margin=-0.1", "data.min_margin"),
    ("data.num_train=0", "data.num_train"),
    ("data.num_val=-1", "data.num_val"),
    ("loss.beta=.nan", "loss.beta"),
])
def test_config_ranges_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be"):
        config_from_dict({}, [override])


def test_config_range_error_is_one_line_exit_2(capsys):
    assert cli.main(["prepare-data", "loss.beta=-0.1"]) == 2
    assert "loss.beta: must be > 0" in _one_line(capsys.readouterr().err)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3),
                                                      dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _huge_header_png() -> bytes:
    """A valid 8x8 PNG whose IHDR claims 100000 x 100000 pixels (CRC fixed)."""
    data = bytearray(_png(8, 8))
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", 100_000, 100_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture
def refcoco(tmp_path):
    """A RefCOCO-style JSONL whose line 2 names a truncated PNG, line 3 a decompression bomb,
    line 4 holds a non-UTF-8 byte; line 1 is good."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "good.png").write_bytes(_png(32, 32))
    (tmp_path / "img" / "cut.png").write_bytes(_png(32, 32)[:150])
    (tmp_path / "img" / "bomb.png").write_bytes(_huge_header_png())

    def line(image, sentence="the thing"):
        return json.dumps({"image": image, "bbox": [1, 1, 10, 10], "sentence": sentence,
                           "split": "train"}).encode()

    path = tmp_path / "refs.jsonl"
    path.write_bytes(b"\n".join([line("good.png"), line("cut.png"), line("bomb.png"),
                                 line("good.png", "caf\xe9").replace(b"\\u00e9", b"\xe9")]))
    return tmp_path


@pytest.mark.parametrize("line, needle", [
    (2, "cannot be read (decoding it failed)"), (3, "decompression bomb"),
    (4, "not UTF-8 text (byte 0xe9"),
])
def test_undecodable_entries_name_file_and_line(refcoco, line, needle):
    from perpo_jax.data.refcoco_style import DataFileError, read_refcoco_jsonl

    path = refcoco / "refs.jsonl"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], lines[line - 1]]))  # the good line + the bad one
    with pytest.raises(DataFileError, match=rf"refs.jsonl:2: .*{re.escape(needle)}"):
        read_refcoco_jsonl(str(path), str(refcoco / "img"))


def test_skip_invalid_skips_undecodable_entries(refcoco):
    from perpo_jax.data.refcoco_style import read_official_lists, read_refcoco_jsonl

    records, skipped = read_refcoco_jsonl(str(refcoco / "refs.jsonl"), str(refcoco / "img"),
                                          skip_invalid=True)
    assert len(records) == 1 and [s.line for s in skipped] == [2, 3, 4]
    entry = {"image_id": 1, "image_path": "cut.png", "question": "q", "answer": "[0, 0, 1, 1]",
             "answers_gen": ["a", "b"], "iou_scores": [1.0, 0.0]}
    (refcoco / "lists.json").write_text(json.dumps([entry]))
    _, skipped = read_official_lists(str(refcoco / "lists.json"), str(refcoco / "img"),
                                     skip_invalid=True)
    assert "decoding it failed" in skipped[0].reason


def test_prepare_data_names_the_bad_line_without_traceback(refcoco, capsys):
    argv = ["prepare-data", "data.source=refcoco_style", f"data.path={refcoco / 'refs.jsonl'}",
            f"data.image_dir={refcoco / 'img'}", f"data.data_dir={refcoco / 'data'}"]
    assert cli.main(argv) == 1
    assert f"{refcoco / 'refs.jsonl'}:2: image" in _one_line(capsys.readouterr().err)


def test_pope_questions_not_utf8_name_the_line(tmp_path):
    from perpo_jax.data.pope import read_pope_questions
    from perpo_jax.data.refcoco_style import DataFileError

    path = tmp_path / "coco_pope_random.json"
    good = b'{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}'
    path.write_bytes(good + b"\n" + good.replace(b"cat", b"\xff"))
    with pytest.raises(DataFileError, match=r"coco_pope_random.json:2: not UTF-8"):
        read_pope_questions(str(path))


def _zero_data_files(step_dir: Path) -> None:
    for f in glob.glob(str(step_dir / "train_state" / "**" / "d" / "*"), recursive=True):
        Path(f).write_bytes(b"\0" * os.path.getsize(f))


def _drop_manifest(step_dir: Path) -> None:
    (step_dir / "train_state" / "manifest.ocdbt").unlink()


@pytest.mark.parametrize("damage", [_zero_data_files, _drop_manifest])
def test_damaged_step_is_one_line_naming_the_intact_one(trained, tmp_path, capsys, damage):
    root = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints", root)
    damage(root / "3")
    assert cli.main(["export", "--checkpoint", str(root), "--out", str(tmp_path / "hf"),
                     "mesh.shape=[-1,1,1]"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"checkpoint step 3 in {root} is unreadable" in line
    assert f"step 2 is intact: pass --checkpoint {root / '2'}" in line
    assert len(line) < 500 and "tensorstore_spec" not in line
    assert not (tmp_path / "hf").exists()


def test_resume_from_a_damaged_step_names_the_intact_one(tmp_path, capfd):
    import jax
    import jax.numpy as jnp

    from perpo_jax.checkpoint import Checkpointer
    from perpo_jax.hf import CheckpointError

    root = tmp_path / "ckpt"
    _toy_checkpoint(root)
    _zero_data_files(root / "5")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding),
              "b": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding)}
    with Checkpointer(root, save_every=1) as ckpt:
        with pytest.raises(CheckpointError) as err:
            ckpt.restore_latest(target)
    message = str(err.value)
    assert f"checkpoint step 5 in {root} is unreadable (DATA_LOSS" in message
    assert f"step 4 is intact: delete {root / '5'} to resume from step 4" in message
    assert len(message) < 500
    time.sleep(0.5)  # the late read callbacks of the failed restore
    assert "Event loop is closed" not in capfd.readouterr().err


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_setup", interrupted)
    assert cli.main(["prepare-data"]) == 130
    assert "interrupted (Ctrl-C)" in _one_line(capsys.readouterr().err)


def test_ctrl_c_during_training_saves_and_says_how_to_resume(shared, tmp_path):
    """SIGINT after the first step: a checkpoint of the step reached, the resume hint, exit 0,
    no traceback, no orbax tmp dir; the run dir holds only what RUN_ITEMS lists."""
    _, data = shared
    cfg = tiny_cfg(tmp_path, f"data.data_dir={data.data_dir}", "data.task=grounding",
                   "train.rounds=30", *SFT)
    config = _write_yaml(tmp_path / "t.yaml", cfg)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "perpo_jax.cli", "train", "--config",
                                 config], env=env, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not (metrics.exists() and '"kind": "step"' in metrics.read_text()):
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "err.txt").read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert rc == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "SIGINT: stopping after this step with a checkpoint" in stderr
    steps = sorted(int(p) for p in os.listdir(tmp_path / "run" / "checkpoints") if p.isdigit())
    assert f"stopped early, checkpoint saved; rerun the same command to resume from step " \
           f"{steps[-1]}" in stdout
    assert steps[-1] < 60  # stopped well before the 30 rounds x 2 steps
    assert not any("tmp" in p for p in os.listdir(tmp_path / "run" / "checkpoints"))
    assert set(os.listdir(tmp_path / "run")) <= {"checkpoints", *cli_paths.RUN_ITEMS}


class _ReadOnly:
    """`path` behaves as a read-only dir: chmod where that binds (not root), else every
    os.open / os.mkdir creating something under it fails with EROFS."""

    def __init__(self, path: Path, monkeypatch):
        path.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        if os.geteuid() != 0:
            path.chmod(0o555)
            return
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(p):
            if str(p).startswith(self.path + os.sep) or str(p) == self.path:
                raise OSError(errno.EROFS, "Read-only file system", str(p))

        def fake_open(p, flags, *args, **kwargs):
            if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
                refuse(p)
            return real_open(p, flags, *args, **kwargs)

        def fake_mkdir(p, *args, **kwargs):
            refuse(p)
            return real_mkdir(p, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.mark.parametrize("command", ["eval", "train"])
def test_read_only_output_fails_before_the_work(tmp_path, monkeypatch, capsys, command):
    locked = _ReadOnly(tmp_path / "ro", monkeypatch)
    if command == "eval":
        argv = ["eval", "--out", f"{locked.path}/eval", f"data.data_dir={tmp_path / 'data'}"]
    else:
        argv = ["train", f"train.out_dir={locked.path}/run", f"data.data_dir={tmp_path / 'data'}"]
    assert cli.main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert "read-only file system: cannot write" in line or "permission denied" in line
    assert not (tmp_path / "data").exists()  # before any dataset, model or compilation


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("UNKNOWN: Error writing local file \"/x/d/abc\": [OS error: No space left on "
               "device] [tensorstore_spec='{...}']"),  # how tensorstore (orbax) says it
])
def test_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch, failure):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from perpo_jax import write_checks
    from perpo_jax.checkpoint import Checkpointer

    def full(*args, **kwargs):
        raise failure

    root = tmp_path / "checkpoints"
    with Checkpointer(root, save_every=1, async_save=False) as ckpt:
        monkeypatch.setattr(ocp.CheckpointManager, "save", full)
        with pytest.raises(write_checks.OutputWriteError) as err:
            ckpt.maybe_save(1, {"w": jnp.zeros(4)}, {"next": 1})
        monkeypatch.undo()
    assert str(err.value) == f"no space left on device writing checkpoint {root}"
    assert err.value.errno == errno.ENOSPC
    assert write_checks.as_write_error(ValueError("shape mismatch"), "x") is None


def test_full_disk_inside_a_training_run_is_one_line(shared, tmp_path, monkeypatch, capsys):
    """A write deep in the loop (here metrics.jsonl, before the first step) fails: the CLI
    says so in one line and the run dir is unlocked again."""
    from perpo_jax.train.run_log import RunLog

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

    _, data = shared
    monkeypatch.setattr(RunLog, "write", full)
    cfg = _write_yaml(tmp_path / "t.yaml", tiny_cfg(tmp_path, f"data.data_dir={data.data_dir}",
                                                    "data.task=grounding", "train.rounds=1", *SFT))
    assert cli.main(["train", "--config", cfg]) == 1
    err = capsys.readouterr().err
    shown = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err and shown[-1] == (
        f"perpo-jax train: error: No space left on device ({tmp_path}/run/metrics.jsonl)"), err
    assert not (tmp_path / "run" / "run.lock").exists()


def test_skip_reasons_count_why_no_update_was_applied():
    from perpo_jax.train import loop

    history = [{"applied": 0, "loss": 0.0, "grad_norm": 0.0}, {"applied": 1, "loss": 0.3},
               {"applied": 0, "loss": float("nan"), "grad_norm": 1.0}]
    assert loop._skip_reasons(history, empty_rounds=2, skipped=5) == {
        loop.SKIP_NO_GAP: 1, loop.SKIP_NONFINITE: 1, loop.SKIP_EMPTY_ROUND: 2,
        loop.SKIP_EARLIER: 1}


def test_no_update_applied_is_an_error_saying_why(tmp_path, monkeypatch, capsys):
    from perpo_jax.train import loop

    def skipped_everything(cfg):
        return loop.TrainResult(None, [], [], cfg.train.out_dir, 4, False, 4,
                                {loop.SKIP_NO_GAP: 4})

    monkeypatch.setattr(loop, "train", skipped_everything)
    assert cli.main(["train", f"train.out_dir={tmp_path / 'run'}"]) == 1
    captured = capsys.readouterr()
    assert "trained" not in captured.out
    assert _one_line(captured.err) == (
        "perpo-jax train: error: 0 of 4 updates applied: 4 had no list with a reward gap "
        "(every candidate of each list got the same reward); nothing was learned in "
        f"{tmp_path}/run")


def test_config_path_tilde_and_overrides_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.yaml").write_text("eval:\n  num_examples: 3\n")
    argv = ["eval", "--config", "~/t.yaml", "data.num_train=16", "--out", str(tmp_path / "e"),
            "eval.nope=1"]
    assert cli.main(argv) == 2  # the file was found and the late override parsed
    assert "unknown config key(s): eval.nope" in _one_line(capsys.readouterr().err)
    args = cli.parse_args(["eval", "--config", "C", "a.b=1", "--out", "D", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.out == "D"
    with pytest.raises(SystemExit):
        cli.parse_args(["eval", "--out", "D", "--nope"])


def test_demo_help_imports_nothing_heavy():
    probe = ("import sys\nfrom perpo_jax import cli\ntry:\n    cli.main(['demo', '--help'])\n"
             "except SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('jax', 'flax', 'tensorflow_datasets') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "--train-base" in out.stdout and "HEAVY []" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- plots


def test_val_boxes_show_every_box_where_they_agree_and_say_no_box(tmp_path):
    from perpo_jax.data.shapes_scene import COLOURS
    from perpo_jax.eval import report

    grey = np.full((16, 16, 3), 200, np.uint8)
    gt = np.array([[0.25, 0.25, 0.75, 0.75]] * 2)
    preds = {"base": gt.copy(), "PerPO": np.array([gt[0], [np.nan] * 4])}
    path = tmp_path / "boxes.png"
    report.draw_boxes_png(str(path), [grey, grey], gt, preds, ["a", "b"], tile=96, columns=2)
    img = np.asarray(Image.open(path).convert("RGB"))
    first, second = img[20:116, :96], img[20:116, 100:196]
    used = {report.GT_COLOUR, *report.METHOD_COLOURS[:2]}
    assert not used & set(COLOURS.values())  # no box colour is a shape colour
    for colour in used:  # all three agree on tile 1: each still shows
        assert (first == np.array(colour)).all(-1).sum() > 50, colour
    perpo = (second == np.array(report.METHOD_COLOURS[1])).all(-1)
    assert perpo[:20].any() and not perpo[20:].any()  # "PerPO: no box" label, no box


def test_methods_chart_calls_the_base_base(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from perpo_jax.demo import run as demo

    seen = {}
    bar = Axes.bar

    def recording_bar(self, x, height, **kwargs):
        seen["x"] = list(x)
        return bar(self, x, height, **kwargs)

    monkeypatch.setattr(Axes, "bar", recording_bar)
    results = {"sft_warmup": {"metrics": {"acc@0.5": 0.3}}, "perpo": {"metrics": {"acc@0.5": 0.4}}}
    demo._bar_chart(results, str(tmp_path / "methods.png"), "grounding")
    assert seen["x"] == ["base", "perpo"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 512 KiB filesystem (tmpfs), where this process may mount one (root with
    CAP_SYS_ADMIN); skipped elsewhere -- the monkeypatched tests above cover the rest."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_line(tiny_disk, caplog):
    import jax

    from perpo_jax import write_checks
    from perpo_jax.checkpoint import Checkpointer

    with pytest.raises(write_checks.OutputWriteError, match="no space left on device writing"):
        write_checks.check_writable(str(tiny_disk / "run"), "train.out_dir")  # < 1 MiB free
    root = tiny_disk / "ckpt"
    ckpt = Checkpointer(root, save_every=1, async_save=True)
    with pytest.raises(write_checks.OutputWriteError) as err:
        noise = jax.random.normal(jax.random.key(0), (1024, 1024))  # 4 MiB, incompressible
        ckpt.maybe_save(1, {"w": noise}, {"next": 1})
        ckpt.wait()
    ckpt.close()  # the failed save was reported once; closing is quiet
    assert str(err.value) == f"no space left on device writing checkpoint {root}"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # orbax's threads' logs
