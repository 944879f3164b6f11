"""list_logprobs: prefix-shared == naive == an independent per-sequence computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perpo_jax.models.config import tiny_llava_config
from perpo_jax.models.decoder import DecoderLM
from perpo_jax.scoring import list_logprobs, naive_sequences, response_token_logps

VOCAB = 256


def _llava_or_skip():
    try:
        from perpo_jax.models.llava import LlavaModel
    except ImportError:  # the LLaVA port lands separately; the text-only checks still run
        pytest.skip("perpo_jax.models.llava not available yet")
    return LlavaModel


def make_model(kind: str):
    cfg = tiny_llava_config(VOCAB, hidden_size=32, num_layers=2, image_size=16, patch_size=8)
    if kind == "text":
        return DecoderLM(cfg.text, rngs=nnx.Rngs(0)), cfg
    return _llava_or_skip()(cfg, rngs=nnx.Rngs(0)), cfg


def make_batch(cfg, *, with_image: bool, seed=0, b=2, k=3, r=5, text_len=6):
    """Ragged prompts (right-padded), ragged responses, one fully padded candidate."""
    rng = np.random.default_rng(seed)
    n_img = cfg.num_image_tokens if with_image else 0
    p = n_img + text_len
    prompt_len = np.array([p - 2, p][:b] + [p - 1] * max(0, b - 2))
    prompt_ids = rng.integers(1, VOCAB - 2, size=(b, p))
    if with_image:
        prompt_ids[:, 1 : 1 + n_img] = cfg.image_token_id  # BOS, image tokens, text
    prompt_mask = np.arange(p)[None, :] < prompt_len[:, None]
    prompt_ids = np.where(prompt_mask, prompt_ids, 0)
    response_ids = rng.integers(1, VOCAB - 2, size=(b, k, r))
    resp_len = rng.integers(1, r + 1, size=(b, k))
    resp_len[0, 0] = r  # at least one full-length candidate
    resp_len[1, k - 1] = 0  # a padded candidate
    response_mask = np.arange(r)[None, None, :] < resp_len[..., None]
    batch = {
        "prompt_ids": jnp.asarray(prompt_ids, jnp.int32),
        "prompt_mask": jnp.asarray(prompt_mask),
        "response_ids": jnp.asarray(np.where(response_mask, response_ids, 0), jnp.int32),
        "response_mask": jnp.asarray(response_mask),
        "rewards": jnp.asarray(rng.uniform(size=(b, k)), jnp.float32),
        "list_mask": jnp.asarray(resp_len > 0),
    }
    if with_image:
        size = cfg.vision.image_size
        batch["pixel_values"] = jnp.asarray(rng.normal(size=(b, 3, size, size)), jnp.float32)
    return batch


def independent_logprobs(model, batch) -> np.ndarray:
    """One unpadded forward per (list, candidate) with `model(...)`; numpy log-softmax."""
    b, k, _ = batch["response_ids"].shape
    out = np.zeros((b, k))
    for i in range(b):
        plen = int(batch["prompt_mask"][i].sum())
        prompt = np.asarray(batch["prompt_ids"][i, :plen])
        pixels = batch.get("pixel_values")
        pixels = None if pixels is None else pixels[i : i + 1]
        for j in range(k):
            rlen = int(batch["response_mask"][i, j].sum())
            if rlen == 0:
                continue
            resp = np.asarray(batch["response_ids"][i, j, :rlen])
            ids = jnp.asarray(np.concatenate([prompt, resp])[None], jnp.int32)
            logits = np.asarray(model(ids, pixel_values=pixels)[0], np.float64)
            logits = logits - logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            out[i, j] = sum(logp[plen - 1 + t, resp[t]] for t in range(rlen))
    return out


@pytest.mark.parametrize("kind", ["text", "llava"])
def test_shared_prefix_matches_naive_and_independent(kind):
    model, cfg = make_model(kind)
    batch = make_batch(cfg, with_image=kind == "llava")
    shared = np.asarray(jax.jit(lambda b: list_logprobs(model, b))(batch))
    naive = np.asarray(jax.jit(lambda b: list_logprobs(model, b, shared_prefix=False))(batch))
    assert shared.shape == batch["rewards"].shape and shared.dtype == np.float32
    np.testing.assert_allclose(shared, naive, atol=1e-5, rtol=0)
    np.testing.assert_allclose(shared, independent_logprobs(model, batch), atol=1e-4, rtol=1e-5)
    assert shared[1, -1] == 0.0  # padded candidate
    assert np.all(shared[np.asarray(batch["list_mask"])] < 0)


@pytest.mark.parametrize("kind", ["text", "llava"])
def test_shared_prefix_gradients_match_naive(kind):
    model, cfg = make_model(kind)
    batch = make_batch(cfg, with_image=kind == "llava", seed=1)
    graphdef, params = nnx.split(model)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=batch["rewards"].shape), jnp.float32)

    def objective(p, shared):
        m = nnx.merge(graphdef, p)
        return jnp.sum(weights * list_logprobs(m, batch, shared_prefix=shared))

    g_shared = jax.jit(jax.grad(lambda p: objective(p, True)))(params)
    g_naive = jax.jit(jax.grad(lambda p: objective(p, False)))(params)
    flat_s = jax.tree_util.tree_leaves_with_path(g_shared)
    flat_n = jax.tree.leaves(g_naive)
    assert len(flat_s) == len(flat_n) > 0
    reached_vision = False
    for (path, gs), gn in zip(flat_s, flat_n):
        name = jax.tree_util.keystr(path)
        gs, gn = np.asarray(gs), np.asarray(gn)
        np.testing.assert_allclose(gs, gn, atol=1e-5, rtol=1e-5, err_msg=name)  # |g| up to ~30
        if "vision_tower" in name:  # its last layer is unused (features from layer -2)
            reached_vision |= bool(np.abs(gs).max() > 0)
        else:  # every LM / projector parameter gets a gradient through the shared prefix
            assert np.abs(gs).max() > 1e-6, name
    assert reached_vision or kind == "text"


def test_token_logps_are_zero_on_padding_and_sum_to_list_logprobs():
    model, cfg = make_model("text")
    batch = make_batch(cfg, with_image=False, seed=3)
    tok = np.asarray(response_token_logps(model, batch))
    mask = np.asarray(batch["response_mask"])
    assert tok.shape == mask.shape
    assert np.all(tok[~mask] == 0) and np.all(tok[mask] < 0)
    np.testing.assert_allclose(tok.sum(-1), np.asarray(list_logprobs(model, batch)), atol=1e-6)


def test_naive_sequences_place_response_after_real_prompt():
    _, cfg = make_model("text")
    batch = make_batch(cfg, with_image=False, seed=4)
    ids, mask = map(np.asarray, naive_sequences(batch))
    plen = np.asarray(batch["prompt_mask"]).sum(-1)
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            rlen = int(np.asarray(batch["response_mask"])[i, j].sum())
            want = np.concatenate(
                [np.asarray(batch["prompt_ids"])[i, : plen[i]],
                 np.asarray(batch["response_ids"])[i, j, :rlen]]
            )
            assert mask[i, j].sum() == len(want)
            np.testing.assert_array_equal(ids[i, j][mask[i, j]], want)


def test_missing_key_is_a_clear_error():
    model, cfg = make_model("text")
    batch = make_batch(cfg, with_image=False)
    del batch["response_mask"]
    with pytest.raises(KeyError, match="response_mask"):
        list_logprobs(model, batch)
