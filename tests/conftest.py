"""Test session set-up: 8 fake CPU devices, set BEFORE jax is imported anywhere."""
import os
import shutil
import tempfile

from xla_env import xla_flags  # (LLVM optimisation off for XLA:CPU: tests/xla_env.py)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
# CPU only, also when empty: with libtpu installed (requirements-test.txt, for the TPU
# compiler of `perpo-jax plan --tpu`) an unrestricted jax would try to open a TPU. libtpu's
# compile-only devices need no platform of their own; `perpo_jax.tpu_topology` gives libtpu
# its settings (no metadata server, no worker hostnames) only while it starts.
if not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"
# One XLA compilation cache for the session, shared by the xdist workers and every subprocess
# a test starts (they inherit the environment; JAX reads its config from it): the loop, CLI
# and demo tests compile the same tiny programs again and again (a tiny 2-round train run:
# 81 s with a cold cache, 21 s warm, on this 2-core machine). Made by the first process
# (the xdist controller), removed by it at the end; a cache of the user's own is kept.
_CACHE_MADE_HERE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_MADE_HERE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="perpo_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402  (after the environment above, like every jax-importing module)


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """(tmp dir, prepared tiny shapes dataset + processor) for the loop tests, built once."""
    from tiny_run import tiny_cfg

    from perpo_jax.data import prepare

    tmp = tmp_path_factory.mktemp("loop")
    data = prepare.prepare_data(tiny_cfg(tmp, "data.task=test_digits"), progress=False)
    return tmp, data


def pytest_sessionfinish(session, exitstatus):
    if _CACHE_MADE_HERE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
