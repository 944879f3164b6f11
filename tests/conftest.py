"""Test session set-up: 8 fake CPU devices, set BEFORE jax is imported anywhere."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's persistent compilation cache, shared by both test workers and the processes tests
# start: many tests compile the same tiny programs, and compiling dominates the suite's time
# (a 3.7 s compile is read back in 0.4 s). Keys are the programs themselves, never stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"perpo_jax_tests_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest  # noqa: E402  (after the environment above, like every jax-importing module)


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """(tmp dir, prepared tiny shapes dataset + processor) for the loop tests, built once."""
    from tiny_run import tiny_cfg

    from perpo_jax.data import prepare

    tmp = tmp_path_factory.mktemp("loop")
    data = prepare.prepare_data(tiny_cfg(tmp, "data.task=test_digits"), progress=False)
    return tmp, data
