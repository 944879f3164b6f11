"""What a run trains: exact offline passes, one online pass by default, a schedule that reaches
its end whatever is skipped, bf16 frozen base with float32 masters, dropout off as official."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_run import tiny_cfg

from perpo_jax.config import ConfigError
from perpo_jax.mesh import make_mesh
from perpo_jax.assemble import build_run_model
from perpo_jax.rewards import REWARDS, register_reward
from perpo_jax.train.loop import _Trainer, online_plan, train
from perpo_jax.train.optim import make_schedule


def _official_file(tmp_path, scores):
    """An official-format list file, one entry per score vector (3 candidates each)."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    entries = []
    for i, iou in enumerate(scores):
        Image.new("RGB", (40, 30), (20 * i, 200, 10)).save(tmp_path / "img" / f"{i}.jpg")
        entries.append({
            "image_id": i, "image_path": f"{i}.jpg",
            "question": f"Please provide the bounding box coordinate of the region this sentence "
                        f"describes: thing {i}</s>",
            "answer": "[0.1, 0.2, 0.5, 0.6]",
            "answers_gen": ["[0.1, 0.2, 0.5, 0.6]", "[0.12, 0.2, 0.5, 0.6]", "[0.6, 0.6, 0.9, 0.9]"],
            "iou_scores": iou,
        })
    (tmp_path / "lists.json").write_text(json.dumps(entries))
    return ["data.source=official_json", f"data.path={tmp_path / 'lists.json'}",
            f"data.image_dir={tmp_path / 'img'}", "train.mode=offline", "train.steps=0",
            "data.min_margin=0.8"]


def test_offline_epochs_visit_every_kept_list_exactly_once(tmp_path):
    # 7 lists pass the 0.8 margin, 3 do not (gap 0.5): 4 + 3 lists per epoch at 4 per step
    scores = [[1.0, 0.95, 0.0]] * 7 + [[1.0, 0.9, 0.5]] * 3
    cfg = tiny_cfg(tmp_path, *_official_file(tmp_path, scores), "train.epochs=2",
                   "train.lists_per_step=4", "optim.schedule=linear")
    result = train(cfg, progress=False)
    assert [h["num_valid_lists"] for h in result.history] == [4, 3, 4, 3]
    assert result.steps == 4
    # the schedule is exactly as long as the updates that happen: the last one is its end
    lrs = [h["lr"] for h in result.history]
    want = make_schedule(cfg.optim, 4)
    np.testing.assert_allclose(lrs, [float(want(t)) for t in range(4)], rtol=1e-6)


def test_offline_run_that_keeps_nothing_fails_before_building_anything(tmp_path):
    cfg = tiny_cfg(tmp_path, *_official_file(tmp_path, [[1.0, 0.9, 0.5]] * 3))
    with pytest.raises(ConfigError, match=r"none of the 3 lists.*3 with best - worst reward "
                                          r"below data.min_margin=0.8.*0 steps"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_online_default_is_one_pass_and_a_round_too_big_is_a_config_error(tmp_path):
    mesh = make_mesh((-1, 1, 1))
    plan = online_plan(tiny_cfg(tmp_path, "train.rounds=0", "train.steps=0"), mesh, 32)
    # 32 prompts / 8 per round = 4 rounds; ceil(8 prompts / 8 lists per step) = 1 update each
    assert plan.round_steps == (1, 1, 1, 1) and not plan.exact_pass
    with pytest.raises(ConfigError, match=r"sampling.prompts_per_round=64 exceeds the 32"):
        online_plan(tiny_cfg(tmp_path, "sampling.prompts_per_round=64"), mesh, 32)


_CALLS = {"n": 0}


def _nothing_then_digits(texts, targets):
    """Round 0 (first call per prompt batch of 8): every reward equal, so every list is
    dropped; afterwards the share of digits, which a random model's samples spread over."""
    del targets
    _CALLS["n"] += 1
    if _CALLS["n"] <= 8:
        return np.zeros(len(texts), np.float32)
    return np.asarray([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts], np.float32)


if "test_nothing_then_digits" not in REWARDS:
    register_reward("test_nothing_then_digits", _nothing_then_digits)


def test_round_without_lists_still_advances_the_schedule(shared, tmp_path, capsys):
    _, data = shared
    _CALLS["n"] = 0
    cfg = tiny_cfg(tmp_path, "data.task=test_nothing_then_digits", f"data.data_dir={data.data_dir}",
                   "data.min_margin=0.01", "optim.schedule=linear")
    result = train(cfg, data=data, progress=False)
    said = capsys.readouterr().out  # each round says what it kept and why the rest was dropped
    assert ("[round 0] 0/8 lists kept (8 with best - worst reward below "
            "data.min_margin=0.01): its 2 updates are skipped") in said
    assert result.rounds[0]["lists_kept"] == 0 and result.rounds[1]["lists_kept"] > 0
    assert result.steps == 4 and [h["step"] for h in result.history] == [3, 4]
    want = make_schedule(cfg.optim, 4)
    np.testing.assert_allclose([h["lr"] for h in result.history], [float(want(2)), float(want(3))],
                               rtol=1e-6)


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_frozen_base_in_compute_dtype_masters_in_float32_and_dropout_off(shared, tmp_path,
                                                                         disable_dropout):
    _, data = shared
    cfg = tiny_cfg(tmp_path, f"data.data_dir={data.data_dir}", "model.dtype=bfloat16",
                   "lora.enabled=true", "lora.rank=4", "lora.dropout=0.5",
                   "lora.trainable=[multi_modal_projector]",
                   f"train.disable_dropout={str(disable_dropout).lower()}")
    mesh = make_mesh((-1, 1, 1))
    model = build_run_model(cfg, mesh, data.processor)
    trainer = _Trainer(cfg, data, model, mesh, online_plan(cfg, mesh, len(data.train)))

    def floats(tree):
        return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]

    assert floats(trainer.frozen) and all(x.dtype == jnp.bfloat16 for x in floats(trainer.frozen))
    trainable = floats((trainer.state.params, trainer.state.opt_state, trainer.reference))
    assert all(x.dtype == jnp.float32 for x in trainable)
    projector = trainer.state.params["multi_modal_projector"]
    assert floats(projector)  # the projector is trained, not frozen
    rates = {m.rate for _, m in nnx.iter_graph(trainer.model()) if isinstance(m, nnx.Dropout)}
    assert rates == ({0.0} if disable_dropout else {0.5})


def test_online_sampling_pads_to_the_rounds_longest_prompt(shared, tmp_path, monkeypatch):
    """Not to train.max_length - sampling.max_new_tokens: prefill and every decode step's
    attention scale with the padded width."""
    from perpo_jax.data.batching import bucketed
    from perpo_jax.data.examples import prompt_batch_for, record_example
    from perpo_jax.train import rounds

    _, data = shared
    cfg = tiny_cfg(tmp_path, "data.task=test_digits", f"data.data_dir={data.data_dir}",
                   "train.max_length=512")
    examples = [record_example(data.train[i]) for i in range(8)]
    longest = prompt_batch_for(examples, data.processor, None)["prompt_ids"].shape[1]
    widths = []
    real_sample = rounds.sample

    def recording_sample(model, prompts, **kw):
        widths.append(prompts["prompt_ids"].shape[1])
        return real_sample(model, prompts, **kw)

    monkeypatch.setattr(rounds, "sample", recording_sample)
    mesh = make_mesh((-1, 1, 1))
    model = build_run_model(cfg, mesh, data.processor)
    rounds.sample_round_lists(cfg, data.processor, model, mesh, examples, 0)
    assert widths == [bucketed(longest)]
    assert widths[0] < cfg.train.max_length - cfg.sampling.max_new_tokens
