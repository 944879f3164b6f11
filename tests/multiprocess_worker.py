"""One process of tests/test_multiprocess.py (run as a script, never imported by pytest).

    python tests/multiprocess_worker.py OUT_JSON LOCAL_DEVICES [COORDINATOR NUM_PROCESSES ID]

Builds the (2, 2, 2) mesh over every process's devices, draws two rounds of prompts from a
`ShardedLoader` (this host's contiguous block of each global batch), samples K candidates per
prompt with a tiny random LLaVA (the same weights everywhere), rewards this host's own rows,
agrees on counts across hosts, and writes (process 0) what the GLOBAL batch was: indices,
sampled tokens and summed rewards. A 1-process 8-device run must write the same file.
Then it prepares a tiny dataset into a dir of its own (per-host local dirs: process 0
first, the others after a barrier, each building its own copy) and writes a digest of its
records to OUT_JSON's dir as `digest<hosts>_<process>.txt`: every copy must be equal.
"""
import hashlib
import json
import os
import sys

from xla_env import xla_flags  # this script's dir (tests/) is sys.path[0]

out_path, local_devices = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = xla_flags(local_devices)
os.environ["JAX_PLATFORMS"] = "cpu"

from perpo_jax.distributed import initialize_distributed  # noqa: E402

if len(sys.argv) > 3:
    assert initialize_distributed(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
else:
    assert not initialize_distributed()  # no coordinator, not a TPU VM: never starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from perpo_jax.config import config_from_dict  # noqa: E402
from perpo_jax.data.loader import ShardedLoader  # noqa: E402
from perpo_jax.data.prepare import prepare_data  # noqa: E402
from perpo_jax.distributed import process_zero_first  # noqa: E402
from perpo_jax.mesh import make_mesh  # noqa: E402
from perpo_jax.models import build_model, tiny_llava_config  # noqa: E402
from perpo_jax.assemble import place_on_mesh  # noqa: E402
from perpo_jax.sampling import sample  # noqa: E402
from perpo_jax.train.hosts import global_max, local_rows, to_global  # noqa: E402

GLOBAL_PROMPTS, K, R, VOCAB = 8, 3, 4, 64
hosts, me = jax.process_count(), jax.process_index()
assert len(jax.devices()) == 8 and len(jax.local_devices()) == local_devices
mesh = make_mesh((2, 2, 2))
config = tiny_llava_config(VOCAB, hidden_size=32, num_layers=1, image_size=16, patch_size=8)
model = place_on_mesh(build_model(config, rngs=nnx.Rngs(0)), mesh)
n_img = config.num_image_tokens


def prompt(index: int):
    """Prompt of record `index`: a few text tokens around the image tokens, its own image."""
    rng = np.random.default_rng(index)
    text = rng.integers(1, VOCAB - 2, size=3 + index % 3)
    ids = np.concatenate([text[:2], np.full(n_img, config.image_token_id), text[2:]])
    return ids.astype(np.int32), rng.standard_normal((3, 16, 16)).astype(np.float32)


loader = ShardedLoader(list(range(40)), GLOBAL_PROMPTS // hosts, seed=3,
                       process_index=me, process_count=hosts)
report = {"hosts": hosts, "rounds": []}
for round_index in range(2):
    mine = np.asarray(next(loader), np.int64)
    prompts = [prompt(int(i)) for i in mine]
    width = global_max({"p": max(len(p) for p, _ in prompts)})["p"]
    ids = np.zeros((len(mine), width), np.int32)
    mask = np.zeros((len(mine), width), bool)
    for row, (p, _) in enumerate(prompts):
        ids[row, :len(p)], mask[row, :len(p)] = p, True
    pixels = np.stack([px for _, px in prompts])
    batch = {"prompt_ids": ids, "prompt_mask": mask, "pixel_values": pixels}
    # one key for the round; each GLOBAL row gets its own stream inside the sampler
    rng = jax.random.fold_in(jax.random.key(7), round_index)
    out = sample(model, to_global(batch, mesh), num_samples=K, max_new_tokens=R,
                 temperature=1.0, rng=rng, eos_id=None, pad_id=0, mesh=mesh)
    tokens = local_rows(out.tokens)  # this host's rows only
    assert tokens.shape == (len(mine), K, R)
    rewards = (tokens % 7).sum(axis=(1, 2)).astype(np.float32)  # host-side, own rows
    every = multihost_utils.process_allgather(
        {"index": mine, "tokens": tokens, "reward": rewards}, tiled=True)
    report["rounds"].append({k: np.asarray(v).tolist() for k, v in every.items()})
report["loader_state"] = loader.state()
if me == 0:
    with open(out_path, "w") as f:
        json.dump(report, f)

out_dir = os.path.dirname(out_path)
data_cfg = config_from_dict({}, [f"data.data_dir={out_dir}/data{hosts}_{me}", "data.num_train=6",
                                 "data.num_val=2", "data.image_size=32", "data.source=shapes_ocr",
                                 "data.task=ocr"])
data = process_zero_first(lambda: prepare_data(data_cfg, progress=False), "worker_data")
digest = hashlib.sha256()
for i in range(len(data.train)):
    record = data.train[i]
    for key in sorted(record):
        digest.update(key.encode() + np.asarray(record[key]).tobytes())
with open(os.path.join(out_dir, f"digest{hosts}_{me}.txt"), "w") as f:
    f.write(f"{len(data.train)} {digest.hexdigest()}")
multihost_utils.sync_global_devices("done")
print(f"process {me}/{hosts} done", flush=True)
