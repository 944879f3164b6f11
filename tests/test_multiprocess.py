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
from xla_env import xla_flags

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
    env["JAX_PLATFORMS"], env["XLA_FLAGS"] = "cpu", xla_flags()
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = [log_dir / f"proc{i}.log" for i in range(len(commands))]
    procs = []
    for i, cmd in enumerate(commands):
        log = open(paths[i], "w")
        extra = {"XLA_FLAGS": xla_flags(devices[i])} if devices else {}
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
    # per-host local data dirs: each host built its own copy, all equal
    digests = {p.name: p.read_text() for p in tmp_path.glob("digest*.txt")}
    assert sorted(digests) == ["digest1_0.txt", "digest2_0.txt", "digest2_1.txt"]
    assert len(set(digests.values())) == 1 and digests["digest1_0.txt"].startswith("6 ")


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
        "data.task=ocr", "data.source=shapes_ocr", "data.num_train=16", "data.num_val=4",
        "data.min_margin=0.0", "train.mode=online", "train.rounds=1", "train.steps=0",
        "sampling.prompts_per_round=8", "sampling.num_samples=3", "sampling.max_new_tokens=6",
        "train.num_candidates=3", "train.lists_per_step=2", "train.max_length=192",
        "train.max_response_length=8", "optim.lr=1e-3", "optim.warmup_ratio=0.0",
        "mesh.shape=[2,2,2]", "checkpoint.save_every=3", "checkpoint.async_save=false"]


def _train_cmd(run: Path, data_dir: Path) -> list[str]:
    # the real CLI
    return [sys.executable, "-m", "perpo_jax.cli", "train", *TINY,
            f"data.data_dir={data_dir}", f"train.out_dir={run}"]


def _final_params(run: Path) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    ckpt = run / "checkpoints"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    path = str(ckpt / str(step) / "train_state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    state = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree)))

    leaves = jax.tree_util.tree_leaves_with_path(state["params"])
    return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def test_online_run_on_two_processes_equals_one(tmp_path):
    """2 processes x 4 devices vs 1 x 8 on a (2, 2, 2) mesh: online PerPO (data built by
    process 0 into a shared dir while process 1 waits at a barrier, sampling, per-host OCR
    rewards, lists, updates, checkpoints written by both hosts into one dir). The 2-process
    run gets SIGTERM on both hosts after its first round's lists: they agree on one step,
    checkpoint it and exit; rerun, it resumes and ends with the weights of the uninterrupted
    1-process run (<= 1e-5)."""
    import numpy as np

    shared = tmp_path / "shared_data"  # one dir every host sees (a pod's NFS / same path)

    def two(port):
        return [_train_cmd(tmp_path / "two", shared)
                + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(i)] for i in range(2)]

    logs = run_processes([_train_cmd(tmp_path / "one", tmp_path / "data_one")]
                         + two(free_port()), tmp_path / "first", devices=[8, 4, 4],
                         sigterm=([1, 2], 1, "[round 0]"))
    assert "stopped early, checkpoint saved" in logs[1] and "stopped early" in logs[2]
    built = [p for p in shared.rglob("dataset_info.json")]
    assert len(built) == 1, built  # process 1 reused process 0's build
    stopped, _ = _final_params(tmp_path / "two")
    assert 1 <= stopped < 4
    logs = run_processes(two(free_port()), tmp_path / "resume", devices=[4, 4])
    assert f"resuming from step {stopped} of 4" in logs[0]
    step_one, one = _final_params(tmp_path / "one")
    step_two, two_params = _final_params(tmp_path / "two")
    assert step_one == step_two == 4 and one.keys() == two_params.keys()
    # the step batches are the same rows on the same devices: equal to float noise (Adam
    # would blow up any real difference: its first updates are +-lr whatever the gradient)
    worst = max(((float(np.abs(two_params[n] - one[n]).max()), n) for n in one))
    assert worst[0] <= 1e-5, worst
    def rows_of(run):  # what process 0 logged
        return [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]

    def round_rows(run):  # the rounds' statistics (all hosts' together)
        return [{k: v for k, v in row.items() if k not in ("samples_per_s", "time")}
                for row in rows_of(run) if "lists_kept" in row]

    last_two, last_one = round_rows("two")[-1], round_rows("one")[-1]
    assert last_two.keys() == last_one.keys() and last_one["prompts"] == 8
    assert last_two == {k: v if isinstance(v, str) else pytest.approx(v, rel=1e-6)
                        for k, v in last_one.items()}
    steps_two = [r["mean_reward"] for r in rows_of("two") if r.get("kind") == "step"]
    assert steps_two[-1] == pytest.approx(last_one["mean_reward"])  # all hosts', not host 0's
    assert sorted(p.name for p in (tmp_path / "two" / "lists").iterdir()) == ["host000", "host001"]
