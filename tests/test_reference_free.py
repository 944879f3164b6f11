"""Reference-free losses (simpo, orpo) in the step and the loop: the reference model is never
run (neither in the step nor when lists are built), `ref_logps` is ignored, and the loss is the
one `losses.py` gives on the policy's log-probs and the candidates' token counts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_scoring import make_batch
from test_step import host, setup
from tiny_run import tiny_cfg

from perpo_jax.config import LoraConfig, LossConfig
from perpo_jax.losses import LOSSES
from perpo_jax.mesh import make_mesh
from perpo_jax.scoring import list_logprobs
from perpo_jax.train import loop, step as step_module
from perpo_jax.train.step import loss_kwargs, policy_model, uses_reference

LOSS_CFGS = {"simpo": LossConfig(name="simpo", beta=2.0, simpo_gamma_beta_ratio=0.5),
             "orpo": LossConfig(name="orpo", orpo_lambda=0.5)}


def _no_reference(*args, **kwargs):
    raise AssertionError("a reference-free loss ran the reference model")


def test_which_losses_use_the_reference():
    assert [n for n in LOSSES if not uses_reference(n)] == ["simpo", "orpo"]
    assert not uses_reference("sft")


def test_loss_kwargs_carry_each_losses_config_keys():
    rng = np.random.default_rng(0)
    pol, ref = rng.normal(-20, 5, (2, 3, 4)).astype(np.float32)
    rew = np.array([[0.9, 0.1, 0.5, 0.3]] * 3, np.float32)
    mask, lengths = np.ones((3, 4), bool), np.full((3, 4), 6)
    cfg = LossConfig(beta=0.3, gamma=1.5, label_smoothing=0.2, simpo_gamma_beta_ratio=0.7,
                     orpo_lambda=0.4)
    want = {"perpo": ({"beta": 0.3, "gamma": 1.5}), "lipo": {"beta": 0.3},
            "lipo_lambda": {"beta": 0.3}, "dpo": {"beta": 0.3, "label_smoothing": 0.2},
            "ipo": {"beta": 0.3}, "simpo": {"beta": 0.3, "gamma_beta_ratio": 0.7},
            "orpo": {"lam": 0.4}}
    assert set(want) == set(LOSSES)
    for name, kwargs in want.items():
        assert loss_kwargs(dataclasses.replace(cfg, name=name)) == kwargs, name
        if uses_reference(name):
            LOSSES[name](pol, ref, rew, mask, **kwargs)
        else:
            LOSSES[name](pol, rew, mask, lengths=lengths, **kwargs)


@pytest.mark.parametrize("name", sorted(LOSS_CFGS))
def test_step_never_runs_the_reference_and_trains(name, monkeypatch):
    monkeypatch.setattr(step_module, "reference_logps", _no_reference)
    # one device: sharding is tests/test_step.py's business, and one compile is cheaper
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    loss_cfg = LOSS_CFGS[name]
    step, state, frozen, reference, parts, cfg = setup(
        mesh, lora=LoraConfig(rank=8, alpha=16.0, dropout=0.0), loss=loss_cfg)
    batch = make_batch(cfg, with_image=True, b=4, seed=11)
    # the loss losses.py gives on the policy's own log-probs and token counts (LoRA b = 0 at
    # step 0, so the policy is the base model)
    @jax.jit  # one program: op-by-op through the model costs more than its compile
    def direct_loss(params, frozen, batch):
        policy = policy_model(parts.graphdef, params, frozen)
        return LOSSES[name](list_logprobs(policy, batch), batch["rewards"], batch["list_mask"],
                            lengths=batch["response_mask"].sum(-1), **loss_kwargs(loss_cfg))[0]

    want = direct_loss(state.params, frozen, batch)
    # precomputed reference log-probs that would poison the loss (NaN: update skipped) if read
    batch = dict(batch, ref_logps=jnp.full(batch["rewards"].shape, jnp.nan))
    before = host(state.params)
    history = []
    for _ in range(4):
        state, metrics = step(state, frozen, reference, batch)
        history.append(host(metrics))
    np.testing.assert_allclose(history[0]["loss"], float(want), rtol=1e-5)
    assert all(int(m["applied"]) == 1 for m in history) and int(history[-1]["skipped"]) == 0
    moved = [np.abs(x - y).max() for x, y in zip(jax.tree.leaves(host(state.params)),
                                                 jax.tree.leaves(before))]
    assert max(moved) > 0
    assert history[-1]["loss"] < history[0]["loss"], [float(m["loss"]) for m in history]
    assert history[-1]["margin"] > history[0]["margin"]
    if name == "orpo":
        assert "nll" in history[0] and history[0]["nll"] > 0


def test_offline_loop_builds_lists_without_reference_log_probs(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(loop, "build_ref_logps", _no_reference)
    monkeypatch.setattr(step_module, "reference_logps", _no_reference)
    (tmp_path / "img").mkdir()
    entries = []
    for i in range(8):
        Image.new("RGB", (40, 30), (20 * i, 200, 10)).save(tmp_path / "img" / f"{i}.jpg")
        entries.append({
            "image_id": i, "image_path": f"{i}.jpg",
            "question": f"Please provide the bounding box coordinate of: thing {i}",
            "answer": "[0.1, 0.2, 0.5, 0.6]",
            "answers_gen": ["[0.1, 0.2, 0.5, 0.6]", "[0.12, 0.2, 0.5, 0.6]", "[0.6, 0.6, 0.9, 0.9]"],
            "iou_scores": [1.0, 0.95, 0.0],
        })
    (tmp_path / "lists.json").write_text(json.dumps(entries))
    cfg = tiny_cfg(tmp_path, "data.source=official_json", f"data.path={tmp_path / 'lists.json'}",
                   f"data.image_dir={tmp_path / 'img'}", "train.mode=offline", "train.epochs=1",
                   "train.steps=0", "data.min_margin=0.8", "loss.name=simpo", "loss.beta=2.0")
    result = loop.train(cfg, data=None, progress=False)
    assert result.steps == 1
    assert result.history[0]["num_valid_lists"] == 8 and np.isfinite(result.history[0]["loss"])
    saved = list((tmp_path / "run" / "lists").rglob("*.npz"))
    assert saved and all("ref_logps" not in np.load(f).files for f in saved)
