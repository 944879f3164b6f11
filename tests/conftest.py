"""Test session set-up: 8 fake CPU devices, set BEFORE jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# CPU only, also when empty: with libtpu installed (requirements-test.txt, for the TPU
# compiler of `perpo-jax plan --tpu`) an unrestricted jax would try to open a TPU. libtpu's
# compile-only devices need no platform of their own; `perpo_jax.tpu_topology` gives libtpu
# its settings (no metadata server, no worker hostnames) only while it starts.
if not os.environ.get("JAX_PLATFORMS"):
    os.environ["JAX_PLATFORMS"] = "cpu"
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
