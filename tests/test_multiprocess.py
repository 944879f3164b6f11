"""Multi-process on CPU: jax.distributed over gloo, 2 processes x 4 devices vs 1 x 8 devices on
the same (2, 2, 2) mesh. The global batch (prompts, order, sampling keys, sampled tokens,
host-side rewards) must not depend on the number of processes. The processes get a free port
on 127.0.0.1, a time limit, and are killed by their own pids if they overrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perpo_jax.cli import main
from perpo_jax.distributed import check_args, wants_auto

WORKER = Path(__file__).with_name("multiprocess_worker.py")
LIMIT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], log_dir: Path, devices: list[int] | None = None,
                  sigterm: tuple[list[int], int, str] | None = None) -> list[str]:
    """Starts every command (with `devices[i]` fake CPU devices when given), waits up to
    LIMIT_S for all, kills (by pid, each in its own session) whatever is left; returns the
    logs. sigterm=(targets, i, text): SIGTERM to the `targets` once log i shows `text`."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PERPO_JAX_DISTRIBUTED")}
    env["JAX_PLATFORMS"] = "cpu"
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = [log_dir / f"proc{i}.log" for i in range(len(commands))]
    procs = []
    for i, cmd in enumerate(commands):
        log = open(paths[i], "w")
        extra = ({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices[i]}"}
                 if devices else {})
        procs.append((subprocess.Popen(cmd, env={**env, **extra}, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline = time.monotonic() + LIMIT_S
    try:
        if sigterm is not None:
            targets, watched, text = sigterm
            while text not in paths[watched].read_text():
                assert time.monotonic() < deadline and procs[watched][0].poll() is None, \
                    paths[watched].read_text()[-3000:]
                time.sleep(0.2)
            for i in targets:
                procs[i][0].send_signal(signal.SIGTERM)
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
                proc.wait()
            log.close()
    logs = [p.read_text() for p in paths]
    assert all(p.returncode == 0 for p, _ in procs), "\n".join(l[-3000:] for l in logs)
    return logs


def _two(out: Path) -> list[list[str]]:
    port = free_port()
    return [[sys.executable, str(WORKER), str(out), "4", f"127.0.0.1:{port}", "2", str(i)]
            for i in range(2)]


def test_two_processes_see_the_global_batch_of_one(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # the global batch spans both processes' devices: `sample` takes it as it is
    run_processes([[sys.executable, str(WORKER), str(one), "8"]] + _two(two), tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["hosts"], b["hosts"]) == (1, 2)
    assert a["rounds"] == b["rounds"]  # same prompts, order, keys, tokens and rewards
    assert len({i for r in a["rounds"] for i in r["index"]}) == 16  # 2 disjoint rounds of 8
    assert a["loader_state"] == b["loader_state"] == {"epoch": 0, "batch": 2}


def test_distributed_flags_and_auto_detection(monkeypatch, capsys):
    for bad in [("127.0.0.1:1", None, None), ("nohost", 2, 0), ("h:1", 2, 2), (None, 2, 0)]:
        with pytest.raises(ValueError):
            check_args(*bad)
    check_args("10.0.0.2:8476", 2, 1)
    rc = main(["train", "--coordinator", "127.0.0.1:1", "--num-processes", "2"])
    assert rc == 2 and "go together" in capsys.readouterr().err
    for k in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PERPO_JAX_DISTRIBUTED", "1")
    assert wants_auto()
    monkeypatch.setenv("PERPO_JAX_DISTRIBUTED", "0")
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    assert not wants_auto()  # an explicit 0 wins, even on a TPU VM
    monkeypatch.delenv("PERPO_JAX_DISTRIBUTED")
    assert wants_auto()  # a TPU VM's worker variables


# ----------------------------------------------------------------------------- a whole run

TINY = ["model.tiny={hidden_size: 32, num_layers: 1, image_size: 16, patch_size: 8, "
        "vocab_size: 320}", "lora.enabled=true", "lora.rank=4", "data.image_size=32",
        "train.mode=offline", "train.epochs=1", "train.steps=0", "train.lists_per_step=4",
        "train.num_candidates=3", "train.max_length=192", "train.max_response_length=12",
        "data.min_margin=0.0", "optim.lr=1e-3", "optim.warmup_ratio=0.0", "mesh.shape=[2,2,2]",
        "checkpoint.save_every=2", "checkpoint.async_save=false", "data.source=official_json"]


def _official_lists(tmp_path: Path) -> list[str]:
    from PIL import Image

    (tmp_path / "img").mkdir()
    entries = []
    for i in range(14):  # 14 lists, 4 per update: the last update takes 2 (exact pass)
        Image.new("RGB", (40, 30), (15 * i, 200 - 9 * i, 10)).save(tmp_path / "img" / f"{i}.jpg")
        entries.append({
            "image_id": i, "image_path": f"{i}.jpg",
            "question": f"Please provide the bounding box of thing {i}",
            "answer": "[0.1, 0.2, 0.5, 0.6]",
            "answers_gen": ["[0.1, 0.2, 0.5, 0.6]", f"[0.1{i % 10}, 0.2, 0.5, 0.6]",
                            "[0.6, 0.6, 0.9, 0.9]"],
            "iou_scores": [1.0, 0.9 - 0.03 * i, 0.0],
        })
    (tmp_path / "lists.json").write_text(json.dumps(entries))
    return [f"data.path={tmp_path / 'lists.json'}", f"data.image_dir={tmp_path / 'img'}"]


def _train_cmd(run: Path, data_dir: Path, data: list[str]) -> list[str]:
    # the real CLI
    return [sys.executable, "-m", "perpo_jax.cli", "train", *TINY, *data,
            f"data.data_dir={data_dir}", f"train.out_dir={run}"]


def _final_params(run: Path) -> dict:
    import numpy as np
    import orbax.checkpoint as ocp

    ckpt = run / "checkpoints"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    import jax

    path = str(ckpt / str(step) / "train_state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    state = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree)))

    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def test_offline_run_on_two_processes_equals_one(tmp_path):
    """2 processes x 4 devices vs 1 x 8 on a (2, 2, 2) mesh: offline PerPO (lists, reference
    log-probs, updates, checkpoints written by both hosts into one dir). The 2-process run gets SIGTERM on both hosts before its first update:
    they agree on one step, checkpoint it and exit; rerun, it resumes and ends with the
    weights of the uninterrupted 1-process run (<= 1e-5)."""
    import numpy as np

    data = _official_lists(tmp_path)
    # One data dir at the same path for every host (a pod's hosts each have it locally, or
    # share it), built beforehand; the run's saved config names it, so a resumed host with
    # another path would be refused as a different run.
    shared = tmp_path / "data"
    prepare = _train_cmd(tmp_path / "unused", shared, data)
    prepare[prepare.index("train")] = "prepare-data"
    run_processes([prepare], tmp_path / "prepare", devices=[8])

    def two(port):
        return [_train_cmd(tmp_path / "two", shared, data)
                + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(i)] for i in range(2)]

    logs = run_processes([_train_cmd(tmp_path / "one", shared, data)]
                         + two(free_port()), tmp_path / "first", devices=[8, 4, 4],
                         sigterm=([1, 2], 1, "[train] offline"))
    assert "stopped early, checkpoint saved" in logs[1] and "stopped early" in logs[2]
    stopped, _ = _final_params(tmp_path / "two")
    assert 1 <= stopped < 4
    logs = run_processes(two(free_port()), tmp_path / "resume", devices=[4, 4])
    assert f"resuming from step {stopped} of 4" in logs[0]
    step_one, one = _final_params(tmp_path / "one")
    step_two, two_params = _final_params(tmp_path / "two")
    assert step_one == step_two == 4 and one.keys() == two_params.keys()
    for name in one:
        np.testing.assert_allclose(two_params[name], one[name], atol=1e-5, err_msg=name)
    assert (tmp_path / "two" / "metrics.jsonl").exists()  # written by process 0 only
    assert sorted(p.name for p in (tmp_path / "two" / "lists").iterdir()) == ["host000", "host001"]
