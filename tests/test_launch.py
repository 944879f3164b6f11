"""launch/tpu_run.sh: the exact gcloud commands of every subcommand, with a fake `gcloud`
(and `tar`) first on PATH that record their arguments; --dry-run; errors; shellcheck."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_run.sh"
PINS = dict(line.strip().split("==") for line in
            (ROOT / "requirements-test.txt").read_text().splitlines() if "==" in line)
JAX_VERSION = next(line.split("==")[1].strip() for line in
                   (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))

RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "tar"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
                        "CHECKPOINT_DIR", "SPOT", "DRY_RUN")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", CALLS=str(calls), TPU_NAME="perpo",
               ZONE="us-central2-b", PROJECT="proj", CHECKPOINT_DIR="gs://bkt/run1")

    def run(*args, **extra_env):
        if calls.exists():
            calls.unlink()
        proc = subprocess.run(["bash", str(SCRIPT), *args], env={**env, **extra_env},
                              capture_output=True, text=True, timeout=60)
        recorded = ([json.loads(l) for l in calls.read_text().splitlines()]
                    if calls.exists() else [])
        return proc, recorded

    return run


WHERE = ["--zone", "us-central2-b", "--project", "proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "perpo", *WHERE]


def test_create(fake):
    proc, calls = fake("create", "--accelerator-type", "v4-8", "--spot")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["gcloud", "compute", "tpus", "tpu-vm", "create", "perpo", *WHERE,
                      "--accelerator-type", "v4-8", "--version", "tpu-ubuntu2204-base", "--spot"]]
    proc, calls = fake("create", ACCELERATOR_TYPE="v5litepod-8", RUNTIME_VERSION="v2-alpha-x",
                       PROJECT="")
    assert calls == [["gcloud", "compute", "tpus", "tpu-vm", "create", "perpo",
                      "--zone", "us-central2-b", "--accelerator-type", "v5litepod-8",
                      "--version", "v2-alpha-x"]]


def test_setup(fake):
    proc, calls = fake("setup")
    assert proc.returncode == 0, proc.stderr
    archive = "/tmp/perpo_jax_src.tgz"
    assert calls == [
        ["tar", "czf", archive, "--exclude=.venv", "--exclude=runs", "--exclude=.git",
         "-C", str(ROOT), "."],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"perpo:{archive}", *WHERE,
         "--worker=all"],
        [*SSH, "--worker=all", "--command",
         f"mkdir -p perpo_jax && tar xzf {archive} -C perpo_jax && cd perpo_jax && "
         "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . && "
         f".venv/bin/pip install -q 'jax[tpu]=={JAX_VERSION}' gcsfs==2026.7.0 fsspec==2026.7.0"],
    ]


def test_run_all_workers_with_gcs_checkpoints(fake):
    proc, calls = fake("run", "configs/llava15_7b_refcoco_perpo.yaml", "optim.lr=1e-5",
                       "data.path=/data/a b.json")
    assert proc.returncode == 0, proc.stderr
    assert calls == [[*SSH, "--worker=all", "--command",
                      "cd perpo_jax && mkdir -p logs && nohup env PERPO_JAX_DISTRIBUTED=1 "
                      ".venv/bin/perpo-jax train --config configs/llava15_7b_refcoco_perpo.yaml "
                      "checkpoint.dir=gs://bkt/run1 optim.lr=1e-5 data.path=/data/a\\ b.json "
                      "> logs/train.log 2>&1 < /dev/null & echo $! > logs/train.pid"]]
    # flags beat the environment
    proc, calls = fake("run", "c.yaml", "--checkpoint-dir", "gs://other/x", "--name", "tpu2")
    assert calls[0][5] == "tpu2" and "checkpoint.dir=gs://other/x" in calls[0][-1]


def test_status_logs_stop_delete(fake):
    pid = "perpo_jax/logs/train.pid"
    _, calls = fake("status")
    assert calls == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "perpo", *WHERE,
         "--format=value(state,acceleratorType,health)"],
        [*SSH, "--worker=all", "--command",
         f'if kill -0 $(cat {pid} 2>/dev/null) 2>/dev/null; then echo "$(hostname): training"; '
         'else echo "$(hostname): not training"; fi; '
         "tail -n 1 perpo_jax/logs/train.log 2>/dev/null || true"]]
    _, calls = fake("logs", "--worker", "1", "--lines", "200")
    assert calls == [[*SSH, "--worker=1", "--command", "tail -n 200 perpo_jax/logs/train.log"]]
    _, calls = fake("logs")
    assert calls == [[*SSH, "--worker=all", "--command", "tail -n 50 perpo_jax/logs/train.log"]]
    _, calls = fake("stop")
    assert calls == [[*SSH, "--worker=all", "--command",
                      f'kill -TERM $(cat {pid}) 2>/dev/null || echo "$(hostname): not training"']]
    _, calls = fake("delete")
    assert calls == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "perpo", *WHERE, "--quiet"]]


def test_setup_pins_match_the_tested_ones():
    text = SCRIPT.read_text()
    assert f'GCSFS_PINS="gcsfs=={PINS["gcsfs"]} fsspec=={PINS["fsspec"]}"' in text


def test_dry_run_prints_every_command_and_runs_none(fake):
    proc, calls = fake("setup", "--dry-run")
    assert proc.returncode == 0 and calls == []
    lines = proc.stdout.strip().splitlines()
    assert [l.split()[0] for l in lines] == ["tar", "gcloud", "gcloud"]
    assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/perpo_jax_src.tgz "
                        "perpo:/tmp/perpo_jax_src.tgz --zone us-central2-b --project proj --worker=all")
    proc, calls = fake("delete", DRY_RUN="1")
    assert calls == [] and proc.stdout == ("gcloud compute tpus tpu-vm delete perpo --zone "
                                           "us-central2-b --project proj --quiet\n")
    # the printed run command is valid shell: the same words as the real call
    proc, _ = fake("run", "--dry-run", "c.yaml", "a.b=x y")
    _, calls = fake("run", "c.yaml", "a.b=x y")
    words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + proc.stdout.strip()[len("gcloud "):]],
                           capture_output=True, text=True).stdout.splitlines()
    assert ["gcloud", *words] == calls[0]


def test_help_and_errors(fake):
    proc, calls = fake("--help")
    assert proc.returncode == 0 and "run CONFIG" in proc.stdout and calls == []
    for args, env, message in [
        (("run", "c.yaml"), {"CHECKPOINT_DIR": "/local/ckpt"}, "gs://"),
        (("run", "c.yaml"), {"CHECKPOINT_DIR": ""}, "CHECKPOINT_DIR"),
        (("run",), {}, "CONFIG"),
        (("create",), {}, "ACCELERATOR_TYPE"),
        (("create",), {"ACCELERATOR_TYPE": "v9-8"}, "--runtime-version"),
        (("status",), {"ZONE": ""}, "ZONE"),
        (("frobnicate",), {}, "unknown subcommand"),
        (("status", "--bogus"), {}, "unknown option"),
        ((), {}, "usage"),
    ]:
        proc, calls = fake(*args, **env)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert calls == [], args


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (CI installs it: .ci/run)")
def test_shellcheck():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
