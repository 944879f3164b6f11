"""Checkpoints: bitwise round trips, sharded restore, cadence, keep-last-k, atomicity,
SIGTERM preemption and exact resume (6 steps == 3 + save + restore + 3)."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from xla_env import xla_flags

from perpo_jax import mesh as mesh_lib
from perpo_jax.checkpoint import Checkpointer, PreemptionGuard, restore_target

REPO = Path(__file__).resolve().parents[1]

# A training-like loop used both in-process and as a subprocess (SIGTERM test): a tiny MLP,
# a jitted SGD step that donates its state and consumes an RNG key (dropout), and a data
# "iterator" whose position is a JSON dict.
TOY_LOOP = textwrap.dedent(
    '''
    import functools, os, signal, sys
    import jax, jax.numpy as jnp, numpy as np
    from perpo_jax.checkpoint import Checkpointer, PreemptionGuard

    PREEMPTED_EXIT = 42

    def init_state():
        k1, k2 = jax.random.split(jax.random.key(0))
        params = {"w1": jax.random.normal(k1, (4, 8)) * 0.5, "b1": jnp.zeros(8),
                  "w2": jax.random.normal(k2, (8, 1)) * 0.5}
        return {"params": params, "step": jnp.int32(0), "rng": jax.random.key(1)}

    def batch_at(index):
        rng = np.random.default_rng(index)
        x = rng.normal(size=(16, 4)).astype(np.float32)
        return x, np.sin(x.sum(1, keepdims=True))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        rng, drop_key = jax.random.split(state["rng"])
        def loss_fn(p):
            h = jnp.tanh(x @ p["w1"] + p["b1"])
            h = jnp.where(jax.random.bernoulli(drop_key, 0.9, h.shape), h / 0.9, 0.0)
            return jnp.mean((h @ p["w2"] - y) ** 2)
        grads = jax.grad(loss_fn)(state["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, state["params"], grads)
        return {"params": params, "step": state["step"] + 1, "rng": rng}

    def run(ckpt_dir, total_steps, *, save_every=100, kill_at=None):
        """Trains up to `total_steps`, resuming from ckpt_dir. -> (state, start, preempted)"""
        state = init_state()
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        data = {"next_index": 0}
        with Checkpointer(ckpt_dir, save_every=save_every, keep=2) as ckpt, \\
                PreemptionGuard() as guard:
            restored = ckpt.restore_latest(abstract)
            if restored is not None:
                state, data, _ = restored
            start = int(state["step"])
            while int(state["step"]) < total_steps:
                x, y = batch_at(data["next_index"])
                state = train_step(state, x, y)
                data = {"next_index": data["next_index"] + 1}
                step = int(state["step"])
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                ckpt.maybe_save(step, state, data)
                if guard.stop_now(step):
                    ckpt.maybe_save(step, state, data, force=True)
                    ckpt.wait()
                    return state, start, True
            ckpt.maybe_save(int(state["step"]), state, data, force=True)
        return state, start, False

    if __name__ == "__main__":
        ckpt_dir, total, kill_at, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        state, start, preempted = run(ckpt_dir, total, kill_at=kill_at or None)
        np.savez(out, start=start, step=np.asarray(state["step"]),
                 rng=np.asarray(jax.random.key_data(state["rng"])),
                 **{k: np.asarray(v) for k, v in state["params"].items()})
        sys.exit(PREEMPTED_EXIT if preempted else 0)
    '''
)


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy_loop.py"
    path.write_text(TOY_LOOP)
    spec = importlib.util.spec_from_file_location("toy_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_host(x):
    """Leaf → numpy, typed PRNG keys as their key data (dtype checked separately)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_as_host(x), _as_host(y))


def abstract_of(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class TinyModel(nnx.Module):
    """Params carry logical axis names like the real models (perpo_jax.mesh rules)."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(1.0)
        self.up = nnx.Param(init(rngs.params(), (8, 16)), out_sharding=("embed", "mlp"),
                            eager_sharding=False)
        self.down = nnx.Param(init(rngs.params(), (16, 8)), out_sharding=("mlp", "embed"),
                              eager_sharding=False)
        self.norm = nnx.Param(jnp.ones((8,)), out_sharding=("norm",), eager_sharding=False)


def make_train_state():
    """A train-state pytree like the real one: nnx params, adamw state after one update,
    int32 step, typed keys (two PRNG impls), a raw uint32 key, a skipped counter."""
    params = nnx.state(TinyModel(nnx.Rngs(0)), nnx.Param)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p * 3.0), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(7),
        "rng": jax.random.key(3),
        "rng_rbg": jax.random.key(4, impl="rbg"),
        "raw_key": jax.random.PRNGKey(5),
        "skipped": jnp.int32(1),
    }


def test_round_trip_is_bitwise(tmp_path):
    state = make_train_state()
    data_state = {"epoch": 1, "index": 96, "shard_order": [3, 1, 2], "seed": 0}
    with Checkpointer(tmp_path / "ckpt", save_every=5, metadata={"model": "tiny"}) as ckpt:
        assert ckpt.restore_latest(abstract_of(state)) is None
        assert ckpt.maybe_save(7, state, data_state, force=True)
        ckpt.wait()
    with Checkpointer(tmp_path / "ckpt", save_every=5) as ckpt:
        restored, restored_data, step = ckpt.restore_latest(abstract_of(state))
        assert ckpt.read_metadata() == {"model": "tiny"}
    assert step == 7
    assert restored_data == data_state
    assert isinstance(restored["params"], nnx.State)
    assert isinstance(restored["params"]["up"], nnx.Param)
    assert jax.random.key_impl(restored["rng_rbg"]) == jax.random.key_impl(state["rng_rbg"])
    assert_bitwise_equal(restored, state)


def test_restore_onto_mesh_shardings(tmp_path):
    mesh = mesh_lib.make_mesh((2, 2, 2))
    state = make_train_state()
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.maybe_save(1, state, {})  # saved from single-device arrays
    # The target the way a sharded run builds it: shapes only, params by the logical rules,
    # optimizer moments like their params, everything else replicated.
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(make_train_state)
    param_shardings = mesh_lib.state_shardings(shapes["params"], mesh)  # one per Variable
    mu_nu = {"mu": param_shardings, "nu": param_shardings, "count": replicated}
    shardings = {k: replicated for k in shapes}
    shardings["params"] = param_shardings
    shardings["opt_state"] = jax.tree.map(
        lambda opt: type(opt)(**mu_nu) if isinstance(opt, optax.ScaleByAdamState) else replicated,
        shapes["opt_state"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    abstract = restore_target(shapes, shardings)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        restored, _, _ = ckpt.restore_latest(abstract)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
    assert restored["params"]["up"][...].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert restored["opt_state"][0].mu["down"][...].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert_bitwise_equal(restored, state)


def test_restore_target_without_sharding_is_a_clear_error(tmp_path):
    state = {"w": jnp.ones((2, 3))}
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.maybe_save(1, state, {})
        with pytest.raises(ValueError, match=r"\['w'\] has no sharding"):
            ckpt.restore_latest({"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
        wrong = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=state["w"].sharding),
                 "lora": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=state["w"].sharding)}
        with pytest.raises(ValueError, match="does not match the train state"):
            ckpt.restore_latest(wrong)


def test_data_state_must_be_json(tmp_path):
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        with pytest.raises(TypeError, match="data_state is not JSON-serialisable"):
            ckpt.maybe_save(1, {"w": jnp.ones(2)}, {"pos": np.ones(2)})
        assert ckpt.all_steps() == []


def test_save_every_cadence_and_forced_saves(tmp_path):
    state = {"w": jnp.arange(3.0)}
    with Checkpointer(tmp_path / "ckpt", save_every=3, keep=None) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.maybe_save(s, state, {"next_index": s})]
        assert saved == [3, 6, 9]
        assert ckpt.maybe_save(10, state, {"next_index": 10}, force=True)
        assert not ckpt.maybe_save(10, state, {"next_index": 10}, force=True)  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [3, 6, 9, 10]
        assert ckpt.restore(6, abstract_of(state)).data_state == {"next_index": 6}


def test_keep_last_k(tmp_path):
    with Checkpointer(tmp_path / "ckpt", save_every=1, keep=2) as ckpt:
        for s in range(1, 6):
            ckpt.maybe_save(s, {"w": jnp.full((2,), float(s))}, {"next_index": s})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        restored = ckpt.restore_latest(abstract_of({"w": jnp.zeros(2)}))
    assert restored.step == 5 and float(restored.train_state["w"][0]) == 5.0
    on_disk = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert on_disk == ["4", "5"]


def test_unfinalised_newer_step_is_ignored(tmp_path):
    """A save killed half-way is a `<step>.orbax-checkpoint-tmp` dir without commit
    files; the previous step stays the latest and the resumed run can write that step."""
    root = tmp_path / "ckpt"
    old = {"w": jnp.full((4,), 2.0)}
    with Checkpointer(root, save_every=2) as ckpt:
        ckpt.maybe_save(2, old, {"next_index": 2})
    half = root / "4.orbax-checkpoint-tmp"  # the name orbax 0.12 gives a step in flight
    shutil.copytree(root / "2", half)
    for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        (half / marker).unlink(missing_ok=True)
    with Checkpointer(root, save_every=2) as ckpt:
        assert ckpt.all_steps() == [2]
        restored = ckpt.restore_latest(abstract_of(old))
        assert restored.step == 2 and restored.data_state == {"next_index": 2}
        assert_bitwise_equal(restored.train_state, old)
        new = {"w": jnp.full((4,), 4.0)}
        assert ckpt.maybe_save(4, new, {"next_index": 4})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
        assert_bitwise_equal(ckpt.restore_latest(abstract_of(new)).train_state, new)
    assert not half.exists()


def _subprocess_env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = xla_flags(1)
    return env


KILL_MID_SAVE = textwrap.dedent(
    '''
    import os, signal, sys
    import jax.numpy as jnp
    from perpo_jax.checkpoint import Checkpointer
    root = sys.argv[1]
    ckpt = Checkpointer(root, save_every=2, async_save=True)
    def state(v):  # 8 MiB of ballast so the async write is still running when we die
        return {"w": jnp.full((4,), v), "ballast": jnp.full((2048, 1024), v)}
    ckpt.maybe_save(2, state(2.0), {"next_index": 2})
    ckpt.wait()
    ckpt.maybe_save(4, state(4.0), {"next_index": 4})
    if os.path.exists(os.path.join(root, "4")):
        sys.exit(3)  # the save won the race against the kill
    os.kill(os.getpid(), signal.SIGKILL)
    '''
)


def test_kill_during_async_save_keeps_previous_step(tmp_path):
    script = tmp_path / "kill_mid_save.py"
    script.write_text(KILL_MID_SAVE)
    root = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(script), str(root)], env=_subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip("the async save finished before the process could kill itself")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [p.name for p in root.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and not (root / "4").exists()  # the kill landed inside the save of 4
    like = {"w": jnp.zeros(4), "ballast": jnp.zeros((2048, 1024))}
    with Checkpointer(root, save_every=2) as ckpt:
        assert ckpt.all_steps() == [2]
        restored = ckpt.restore_latest(abstract_of(like))
        assert ckpt.maybe_save(4, like, {"next_index": 4})  # the resumed run redoes step 4
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
    assert not any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir())
    assert restored.step == 2 and restored.data_state == {"next_index": 2}
    assert float(restored.train_state["w"][0]) == 2.0
    assert float(restored.train_state["ballast"][-1, -1]) == 2.0


def test_resume_is_bitwise_toy(tmp_path, toy):
    """6 steps straight == 3 steps + save + restore + 3 steps."""
    straight, start, preempted = toy.run(tmp_path / "a", 6)
    assert start == 0 and not preempted
    first, start, _ = toy.run(tmp_path / "b", 3)
    assert start == 0 and int(first["step"]) == 3
    resumed, start, _ = toy.run(tmp_path / "b", 6)
    assert start == 3
    assert_bitwise_equal(resumed, straight)


def test_sigterm_saves_and_resumes_exactly(tmp_path):
    script = tmp_path / "toy_loop.py"
    script.write_text(TOY_LOOP)

    def launch(ckpt_dir, kill_at, out):
        cmd = [sys.executable, str(script), str(ckpt_dir), "6", str(kill_at), str(out)]
        return subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True,
                              timeout=300)

    straight = launch(tmp_path / "a", 0, tmp_path / "straight.npz")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = launch(tmp_path / "b", 3, tmp_path / "killed.npz")
    assert killed.returncode == 42, killed.stderr[-3000:]  # preempted: saved and exited
    with Checkpointer(tmp_path / "b", save_every=100) as ckpt:
        assert ckpt.all_steps() == [3]
    resumed = launch(tmp_path / "b", 0, tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert int(np.load(tmp_path / "killed.npz")["step"]) == 3
    assert int(got["start"]) == 3 and int(got["step"]) == 6
    for name in ("w1", "b1", "w2", "rng"):
        np.testing.assert_array_equal(got[name], want[name])


def test_preemption_guard_flag_and_handler_restore():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.stop_now(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.stop_now(2)
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- the real train step


# The recipe's LoRA dropout: its masks come from the train state's RNG key, so an exact
# resume also proves the key was restored.
REAL_LORA_DROPOUT = 0.05


def real_batch_at(index, cfg, *, lists=4, k=3, r=4, text_len=3):
    """Deterministic list batch number `index` (the data position) for a tiny LLaVA."""
    rng = np.random.default_rng(1000 + index)
    n_img = cfg.num_image_tokens
    prompt_ids = rng.integers(1, cfg.image_token_id - 1, size=(lists, 1 + n_img + text_len))
    prompt_ids[:, 1: 1 + n_img] = cfg.image_token_id  # BOS, image tokens, text
    size = cfg.vision.image_size
    return {
        "pixel_values": rng.normal(size=(lists, 3, size, size)).astype(np.float32),
        "prompt_ids": prompt_ids.astype(np.int32),
        "prompt_mask": np.ones(prompt_ids.shape, bool),
        "response_ids": rng.integers(1, cfg.image_token_id - 1, (lists, k, r)).astype(np.int32),
        "response_mask": np.arange(r)[None, None] < rng.integers(1, r + 1, size=(lists, k, 1)),
        "rewards": rng.uniform(size=(lists, k)).astype(np.float32),
        "list_mask": np.ones((lists, k), bool),
    }


def real_setup():
    """Tiny LLaVA + LoRA on a (2,2,2) mesh with the real jitted step (compiled once)."""
    from perpo_jax.config import LoraConfig, LossConfig, OptimConfig
    from perpo_jax.models.config import tiny_llava_config
    from perpo_jax.models.llava import LlavaModel
    from perpo_jax.train import (apply_lora, build_train_step, create_train_state,
                                 make_optimizer, partition_model, train_state_shardings)
    from perpo_jax.train.state import init_train_state

    cfg = tiny_llava_config(128, hidden_size=32, num_layers=2, image_size=16, patch_size=8)
    model = LlavaModel(cfg, rngs=nnx.Rngs(0))
    lora_cfg = LoraConfig(rank=4, alpha=8.0, dropout=REAL_LORA_DROPOUT)
    apply_lora(model, lora_cfg, nnx.Rngs(1))
    parts = partition_model(model, lora_cfg)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.2), total_steps=6)
    _, frozen, reference = create_train_state(parts, tx, mesh, seed=0)
    shapes = jax.eval_shape(lambda p: init_train_state(p, tx, 0), parts.params)
    step_fn = build_train_step(parts.graphdef, shapes, frozen, reference, loss_cfg=LossConfig(),
                               optimizer=tx, schedule=schedule, mesh=mesh)
    return {
        "cfg": cfg, "frozen": frozen, "reference": reference, "step_fn": step_fn,
        "fresh_state": lambda: create_train_state(parts, tx, mesh, seed=0)[0],
        "target": restore_target(shapes, train_state_shardings(shapes, mesh)),
    }


def real_run(setup, ckpt_dir, total_steps, *, save_every=100):
    """The loop's resume path: the train state from the latest checkpoint in `ckpt_dir`
    (restored onto the mesh shardings) or fresh; data position from the checkpoint.
    Returns (train state, step resumed from)."""
    data = {"next_index": 0}
    with Checkpointer(ckpt_dir, save_every=save_every, metadata={"lora_rank": 4}) as ckpt:
        restored = ckpt.restore_latest(setup["target"])
        if restored is None:
            state = setup["fresh_state"]()
        else:
            state, data, _ = restored
        start = int(state.step)
        while int(state.step) < total_steps:
            batch = real_batch_at(data["next_index"], setup["cfg"])
            state, _ = setup["step_fn"](state, setup["frozen"], setup["reference"], batch)
            data = {"next_index": data["next_index"] + 1}
            ckpt.maybe_save(int(state.step), state, data)  # async; the state is donated next
        ckpt.maybe_save(int(state.step), state, data, force=True)
    return state, start


def test_resume_is_bitwise_real_step(tmp_path):
    """6 steps straight == 3 steps + save + restore + 3 steps, real LoRA step, sharded."""
    pytest.importorskip("perpo_jax.train.step")
    setup = real_setup()
    straight, _ = real_run(setup, tmp_path / "a", 6)
    first, _ = real_run(setup, tmp_path / "b", 3, save_every=2)
    assert int(first.step) == 3
    resumed, start = real_run(setup, tmp_path / "b", 6, save_every=2)
    assert start == 3
    assert int(resumed.step) == 6 and int(resumed.skipped) == 0
    lora_b = [x for p, x in jax.tree_util.tree_leaves_with_path(resumed.params) if "lora" in
              jax.tree_util.keystr(p)]
    assert lora_b and any(float(jnp.abs(x).max()) > 0 for x in lora_b)
    for got, want in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        assert got.sharding == want.sharding
    assert_bitwise_equal(resumed, straight)
