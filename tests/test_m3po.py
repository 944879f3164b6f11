"""M3PO: M3P-Score pair selection on hand-built pools, the baselines, confidence against
transformers, and a miniature M3PO run through the real loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from perpo_jax.m3po import (confidence, m3p_select, mean_token_logps, pair_arrays, random_pairs,
                            rm_pairs)


def _lp(c):
    """mean log-prob giving confidence c."""
    return np.log(np.asarray(c, np.float64))


def test_confidently_wrong_candidate_is_the_negative():
    # candidate 0 right; 1 wrong and unsure; 2 wrong and confident; 3 half right
    mas = np.array([[0.9, 0.1, 0.2, 0.5]])
    conf = np.array([[0.5, 0.05, 0.95, 0.5]])
    chosen, rejected, valid = m3p_select(mas, _lp(conf), np.ones((1, 4), bool))
    assert valid.tolist() == [True] and chosen.tolist() == [0]
    # scores: 1 -> .5*.05 + .5*.9 = .475 ; 2 -> .5*.95 + .5*.8 = .875 ; 3 -> .25 + .25 = .5
    assert rejected.tolist() == [2]
    # alpha = 0: confidence ignored, lowest MAS wins; alpha = 1: only confidence
    assert m3p_select(mas, _lp(conf), np.ones((1, 4), bool), alpha=0.0)[1].tolist() == [1]
    assert m3p_select(mas, _lp(conf), np.ones((1, 4), bool), alpha=1.0)[1].tolist() == [2]


def test_preferred_uses_the_confidence_bonus():
    mas = np.array([[0.80, 0.78, 0.1]])
    conf = np.array([[0.1, 0.9, 0.5]])
    # 0.80 + 0.1*0.1 = 0.81 < 0.78 + 0.1*0.9 = 0.87
    chosen, rejected, valid = m3p_select(mas, _lp(conf), np.ones((1, 3), bool), lam=0.1)
    assert chosen.tolist() == [1] and rejected.tolist() == [2] and valid.all()
    assert m3p_select(mas, _lp(conf), np.ones((1, 3), bool), lam=0.0)[0].tolist() == [0]


def test_no_pair_when_nothing_qualifies():
    mask = np.ones((3, 3), bool)
    mas = np.array([[0.9, 0.7, 0.65],     # gaps 0.2, 0.25 < delta 0.3
                    [0.5, 0.5, 0.5],      # all tied
                    [1.0, 0.7, 0.69]])    # 0.7 <= 1.0 - 0.3 qualifies (boundary)
    chosen, rejected, valid = m3p_select(mas, np.zeros((3, 3)), mask, delta=0.3)
    assert valid.tolist() == [False, False, True]
    assert rejected[:2].tolist() == [-1, -1] and chosen[:2].tolist() == [0, 0]
    # fewer than 2 unmasked candidates: never a pair
    one = np.array([[True, False, False]])
    c, r, v = m3p_select(np.array([[1.0, 0.0, 0.0]]), np.zeros((1, 3)), one)
    assert not v[0] and c[0] == 0 and r[0] == -1
    c, r, v = m3p_select(np.array([[1.0, 0.0]]), np.zeros((1, 2)), np.zeros((1, 2), bool))
    assert not v[0] and c[0] == -1 and r[0] == -1


def test_exact_ties_go_to_the_lowest_index():
    mas = np.array([[0.2, 0.9, 0.9, 0.2, 0.2]])
    conf = np.full((1, 5), 0.5)
    chosen, rejected, valid = m3p_select(mas, _lp(conf), np.ones((1, 5), bool))
    assert (chosen[0], rejected[0], valid[0]) == (1, 0, True)
    # reversed preference ties: still the lowest index among the tied best
    chosen, rejected, _ = m3p_select(mas[:, ::-1].copy(), _lp(conf), np.ones((1, 5), bool))
    assert (chosen[0], rejected[0]) == (2, 0)


def test_masked_candidates_are_ignored_whatever_they_hold():
    mas = np.array([[0.1, 1.0, 0.0, 0.9]])
    mean_logp = np.array([[-0.1, np.nan, -np.inf, -0.2]])
    mask = np.array([[True, False, False, True]])
    mas_bad = mas.copy()
    mas_bad[0, 2] = np.nan  # padding may hold garbage
    chosen, rejected, valid = m3p_select(mas_bad, mean_logp, mask)
    assert (chosen[0], rejected[0], valid[0]) == (3, 0, True)
    with pytest.raises(ValueError, match=r"mas\[0, 0\]"):
        m3p_select(np.array([[1.5, 0.0]]), np.zeros((1, 2)), np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="must all be"):
        m3p_select(np.zeros((2, 3)), np.zeros((2, 2)), np.ones((2, 3), bool))


def test_baselines_rm_and_random():
    mas = np.array([[0.5, 0.9, 0.1, 0.65], [0.5, 0.5, 0.4, 0.45]])
    mask = np.ones((2, 4), bool)
    c, r, v = rm_pairs(mas, mask, delta=0.3)
    assert c.tolist() == [1, 0] and r.tolist() == [2, -1] and v.tolist() == [True, False]
    seen = set()
    for seed in range(40):
        c, r, v = random_pairs(mas, mask, delta=0.3, rng=np.random.default_rng(seed))
        assert v.tolist() == [True, False]
        assert mas[0, r[0]] <= mas[0, c[0]] - 0.3
        seen.add((int(c[0]), int(r[0])))
    # qualifying pairs of row 0 (MAS gap >= 0.3): (0,2) (1,0) (1,2) (3,2)
    assert seen == {(0, 2), (1, 0), (1, 2), (3, 2)}


def test_pair_arrays_cut_lists_to_two_candidates():
    arrays = {"response_ids": np.arange(2 * 3 * 2).reshape(2, 3, 2),
              "response_mask": np.ones((2, 3, 2), bool), "rewards": np.zeros((2, 3), np.float32),
              "list_mask": np.ones((2, 3), bool), "prompt_ids": np.array([[7], [8]])}
    mas = np.array([[0.9, 0.1, 0.5], [0.3, 0.2, 0.9]])
    out = pair_arrays(arrays, np.array([0, 2]), np.array([1, -1]), np.array([True, False]), mas)
    assert out["response_ids"].tolist() == [[[0, 1], [2, 3]]]
    assert out["rewards"].tolist() == [[pytest.approx(0.9), pytest.approx(0.1)]]
    assert out["prompt_ids"].tolist() == [[7]] and out["list_mask"].all()


def test_sft_on_the_preferred_response_trains_on_the_chosen_candidate():
    """The "SFT on the preferred response" baseline (m3po.pairs=m3p, loss.name=sft,
    loss.sft_target=best): its target is the M3P-chosen candidate, whatever its index in the
    pool and even when the rejected one is the model's favourite."""
    from perpo_jax.train.step import sft_targets

    mas = np.array([[0.2, 0.95, 0.1], [0.6, 0.1, 0.7]])
    mean_logp = np.log(np.array([[0.9, 0.2, 0.99], [0.5, 0.95, 0.1]]))
    chosen, rejected, valid = m3p_select(mas, mean_logp, np.ones((2, 3), bool))
    assert chosen.tolist() == [1, 2] and valid.all()
    arrays = {"response_ids": np.arange(2 * 3 * 2).reshape(2, 3, 2),
              "response_mask": np.ones((2, 3, 2), bool), "rewards": mas.astype(np.float32),
              "list_mask": np.ones((2, 3), bool)}
    pairs = pair_arrays(arrays, chosen, rejected, valid, mas)
    ids, mask = sft_targets({k: jnp.asarray(v) for k, v in pairs.items()}, "best")
    np.testing.assert_array_equal(np.asarray(ids)[:, 0], arrays["response_ids"][[0, 1], chosen])
    assert np.asarray(mask).all()


def test_confidence_is_exp_mean_logprob_of_transformers_logits():
    """Mean log-probs from our prefix-shared scoring, exp'd, equal the same quantity computed
    independently from a transformers LLaVA's logits (a tiny random model)."""
    import jax.numpy as jnp
    import torch
    import tiny_hf

    from perpo_jax.hf import load_pretrained
    from perpo_jax.scoring import list_logprobs

    hf = tiny_hf.llava(tiny_hf.llama_config(), tiny_hf.clip_config(), seed=3)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d, dtype=jnp.float32)
    ids, pixels = tiny_hf.llava_inputs(hf, batch=1, before=2, after=3)
    rng = np.random.default_rng(0)
    k, r = 3, 5
    resp = rng.integers(1, tiny_hf.IMAGE_TOKEN - 1, size=(1, k, r))
    lengths = np.array([5, 2, 4])
    rmask = np.arange(r)[None, None, :] < lengths[None, :, None]
    batch = {"prompt_ids": jnp.asarray(ids, jnp.int32), "prompt_mask": jnp.ones(ids.shape, bool),
             "pixel_values": jnp.asarray(pixels), "response_ids": jnp.asarray(resp, jnp.int32),
             "response_mask": jnp.asarray(rmask)}
    summed = np.asarray(list_logprobs(ours, batch))
    ours_conf = confidence(mean_token_logps(summed, rmask))[0]
    expected = []
    for j in range(k):
        full = np.concatenate([ids[0], resp[0, j, :lengths[j]]])[None]
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(full), pixel_values=torch.tensor(pixels)).logits
        logp = torch.log_softmax(logits[0].double(), -1).numpy()
        p = ids.shape[1]
        tok = [logp[p - 1 + t, resp[0, j, t]] for t in range(lengths[j])]
        expected.append(np.exp(np.mean(tok)))
    np.testing.assert_allclose(ours_conf, expected, rtol=1e-4)


def test_miniature_m3po_run_through_the_loop(shared, tmp_path):
    """M3PO (M3P-Score pairs, DPO, LoRA) on the tiny loop; then the RM-DPO baseline with the
    `clip` MAS (a tiny random HF CLIPModel dir): the lists' rewards are CLIP MAS."""
    from test_clip_text import save_tiny_clip_dir
    from tiny_run import tiny_cfg

    from perpo_jax.train.loop import train

    _, data = shared
    save_tiny_clip_dir(tmp_path / "clip")
    clip = ("m3po.mas=clip", f"m3po.clip_path={tmp_path / 'clip'}", "m3po.delta=0.001")
    for pairs, extra in (("m3p", ("m3po.delta=0.05",)), ("rm", clip)):
        cfg = tiny_cfg(tmp_path / pairs, "data.task=test_digits", f"data.data_dir={data.data_dir}",
                       "loss.name=dpo", f"m3po.pairs={pairs}", "lora.enabled=true",
                       "lora.rank=4", "lora.alpha=8.0", "train.rounds=1", *extra)
        result = train(cfg, data=data, progress=False)
        assert result.steps == 2
        rnd = result.rounds[0]
        assert rnd["pairs_kept"] > 0 and rnd["pairs_kept"] + rnd["dropped_no_pair"] <= 8
        assert rnd["chosen_mas"] >= rnd["negative_mas"] + (0.05 if pairs == "m3p" else 0.001)
        if pairs == "m3p":
            assert 0.0 < rnd["negative_confidence"] <= 1.0
        from perpo_jax.train.listset import ListSet

        saved = ListSet.load(f"{cfg.train.out_dir}/lists/host000/round_00000.npz")
        assert saved.arrays["response_ids"].shape[1] == 2
        assert (saved.arrays["rewards"][:, 0] > saved.arrays["rewards"][:, 1]).all()
        assert ((saved.arrays["rewards"] >= 0) & (saved.arrays["rewards"] <= 1)).all()
        assert all(np.isfinite(h["loss"]) for h in result.history)
        assert any(h["num_valid_lists"] > 0 for h in result.history)


def test_demo_m3po_method_with_shapes_pope_f1(shared, tmp_path):
    """`perpo-jax demo --method m3po` on tiny everything, shapes-POPE F1 included."""
    from tiny_run import TINY_MODEL

    from perpo_jax.demo import run as demo

    _, data = shared
    report = demo.main([
        "--out", str(tmp_path / "demo"), "--method", "m3po",
        f"data.data_dir={data.data_dir}", "data.task=test_digits", "data.num_train=32", "data.num_val=8",
        "data.image_size=32", TINY_MODEL, "sampling.prompts_per_round=8", "sampling.num_samples=4",
        "sampling.max_new_tokens=8", "train.num_candidates=4", "train.lists_per_step=8",
        "train.rounds=1", "train.steps=1", "train.max_length=192", "train.max_response_length=12",
        "demo.sft_rounds=1", "demo.sft_lists_per_step=8", "demo.sft_prompts_per_round=8",
        "eval.num_examples=8", "eval.batch_size=8", "eval.max_new_tokens=4",
        "data.min_margin=0.0", "m3po.delta=0.01", "demo.pope_images=2",
    ])
    assert set(report["results"]) == {"sft_warmup", "m3po"}
    for res in report["results"].values():
        assert 0.0 <= res["metrics"]["pope_f1"] <= 1.0
        assert set(res["pope"]) == {"random", "popular", "adversarial"}
    assert report["config"]["demo"]["methods"] == ["m3po"]
    assert report["results"]["m3po"]["mean_round_reward"]  # it trained from sampled pairs


def test_m3po_on_shapes_pope_with_a_registered_mas_scorer(tmp_path):
    """data.source=shapes_pope data.task=pope, MAS from a user-registered scorer (a random
    model's yes/no answers would all tie on the POPE reward), then POPE evaluation."""
    from tiny_run import _digit_share, tiny_cfg

    from perpo_jax.data import prepare, shapes_pope
    from perpo_jax.data.examples import record_example
    from perpo_jax.eval.pope import evaluate_pope
    from perpo_jax.mas import MAS_SCORERS, register_mas_scorer
    from perpo_jax.train.loop import train

    if "test_digits_mas" not in MAS_SCORERS:
        register_mas_scorer("test_digits_mas",
                            lambda cfg: lambda texts, example, target: _digit_share(texts, target))
    cfg = tiny_cfg(tmp_path, "data.source=shapes_pope", "data.task=pope", "data.num_train=4",
                   "data.num_val=2", "data.min_objects=1", "data.max_objects=2", "loss.name=dpo",
                   "m3po.pairs=m3p", "m3po.mas=test_digits_mas", "m3po.delta=0.01",
                   "train.rounds=1", "train.steps=1", "eval.max_new_tokens=2")
    data = prepare.prepare_data(cfg, progress=False)
    result = train(cfg, data=data, progress=False)
    assert result.steps == 1 and result.rounds[0]["pairs_kept"] > 0
    builder = shapes_pope.build(cfg.data.data_dir, num_train=4, num_val=2, image_size=32,
                                min_objects=1, max_objects=2)
    splits = {name: [record_example(src[i]) for i in range(len(src))]
              for name, src in shapes_pope.pope_splits(builder).items()}
    report = evaluate_pope(result.model, data.processor, splits, cfg)
    assert set(report["splits"]) == {"random", "popular", "adversarial"}
    assert 0.0 <= report["mean_f1"] <= 1.0
    assert all(len(report["answers"][s]) == len(splits[s]) for s in splits)

