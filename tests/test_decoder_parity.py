"""DecoderLM (Llama GQA, Qwen2 bias + tied) vs transformers, and prefill/extend/cache == full forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_hf
from perpo_jax.hf import load_pretrained

TOL = 1e-4

CASES = {
    "llama_gqa": lambda: tiny_hf.llama_config(),
    "llama_llama3_rope": lambda: tiny_hf.llama_config(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "llama_linear_rope_bias": lambda: tiny_hf.llama_config(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        attention_bias=True,
        mlp_bias=True,
    ),
    "qwen2_bias_tied": lambda: tiny_hf.qwen2_config(),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(case name, HF torch model, our loaded model)."""
    hf = tiny_hf.causal_lm(CASES[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_pretrained(str(path))


def _ids(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, tiny_hf.VOCAB, size=(batch, length))


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = _ids(2, 16)
    diff = np.abs(np.asarray(ours(jnp.asarray(ids))) - tiny_hf.hf_logits(hf, ids)).max()
    print(f"[parity] {name} full forward max|diff| = {diff:.2e}")
    assert diff <= TOL


def test_padded_batch_matches_transformers(pair):
    name, hf, ours = pair
    ids = _ids(3, 12, seed=1)
    mask = np.ones((3, 12), np.int64)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    ref = tiny_hf.hf_logits(hf, ids, attention_mask=mask)
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    diff = np.abs(got - ref)[valid].max()
    print(f"[parity] {name} padded batch max|diff| = {diff:.2e}")
    assert diff <= TOL
    assert np.isfinite(got).all()


def _candidates(seed=2):
    """Right-padded prompts [B, P] and K candidates [B, K, R] with their lengths."""
    rng = np.random.default_rng(seed)
    b, p, k, r = 2, 7, 3, 5
    prompt = rng.integers(0, tiny_hf.VOCAB, size=(b, p))
    prompt_len = np.array([7, 4])
    cand = rng.integers(0, tiny_hf.VOCAB, size=(b, k, r))
    cand_len = np.array([[5, 2, 4], [3, 5, 1]])
    prompt_mask = np.arange(p)[None] < prompt_len[:, None]
    cand_mask = np.arange(r)[None, None] < cand_len[..., None]
    return prompt, prompt_mask, prompt_len, cand, cand_mask, cand_len


def _full_logits(hf, prompt, prompt_len, cand, cand_len, b, k):
    """HF logits of prompt[:len] + cand[:len] (plain forward), split at the prompt length."""
    seq = np.concatenate([prompt[b, : prompt_len[b]], cand[b, k, : cand_len[b, k]]])
    full = tiny_hf.hf_logits(hf, seq[None])[0]
    return full[: prompt_len[b]], full[prompt_len[b]:]


def test_prefill_then_extend_groups_matches_full_forward(pair):
    name, hf, ours = pair
    prompt, prompt_mask, prompt_len, cand, cand_mask, cand_len = _candidates()
    hidden, prefix = ours.prefill(ours.embed(jnp.asarray(prompt)), jnp.asarray(prompt_mask))
    assert len(prefix.k) == ours.config.num_layers and prefix.k[0].shape[:2] == prompt.shape
    r = cand.shape[-1]
    positions = jnp.asarray(prompt_len[:, None, None] + np.arange(r)[None, None])
    embeds = ours.embed(jnp.asarray(cand))
    out, cache = ours.extend(embeds, positions, jnp.asarray(cand_mask), prefix=prefix)
    assert cache is None and out.shape == cand.shape + (ours.config.hidden_size,)
    prompt_logits = np.asarray(ours.logits(hidden))
    cand_logits = np.asarray(ours.logits(out))
    worst = 0.0
    for b in range(cand.shape[0]):
        for k in range(cand.shape[1]):
            ref_p, ref_c = _full_logits(hf, prompt, prompt_len, cand, cand_len, b, k)
            worst = max(worst, np.abs(prompt_logits[b, : prompt_len[b]] - ref_p).max())
            worst = max(worst, np.abs(cand_logits[b, k, : cand_len[b, k]] - ref_c).max())
    print(f"[parity] {name} prefill+extend(K groups) max|diff| = {worst:.2e}")
    assert worst <= TOL
    assert np.isfinite(cand_logits).all()


def test_decode_loop_with_cache_matches_full_forward(pair):
    """prefill prompt, then init_cache + extend one token at a time (cache_index = i)."""
    name, hf, ours = pair
    prompt, prompt_mask, prompt_len, cand, cand_mask, cand_len = _candidates(seed=3)
    b_size, k_size, r = cand.shape
    _, prefix = ours.prefill(ours.embed(jnp.asarray(prompt)), jnp.asarray(prompt_mask))
    cache = ours.init_cache(b_size, k_size, r + 2)
    assert cache.k[0].shape == (b_size, k_size, r + 2, ours.config.num_kv_heads, ours.config.head_dim)
    assert not bool(cache.mask.any())

    @nnx.jit
    def step(model, tok, pos, mask, prefix, cache, i):
        h, cache = model.extend(model.embed(tok), pos, mask, prefix=prefix, cache=cache, cache_index=i)
        return model.logits(h), cache

    steps = []
    for i in range(r):
        pos = jnp.asarray(prompt_len[:, None, None] + i).repeat(k_size, 1)
        logits, cache = step(
            ours, jnp.asarray(cand[:, :, i : i + 1]), pos, jnp.asarray(cand_mask[:, :, i : i + 1]),
            prefix, cache, jnp.int32(i),
        )
        steps.append(np.asarray(logits[:, :, 0]))
    got = np.stack(steps, axis=2)  # [B, K, R, V]
    assert bool(jnp.all(cache.mask[:, :, :r] == jnp.asarray(cand_mask)))
    worst = 0.0
    for b in range(b_size):
        for k in range(k_size):
            _, ref_c = _full_logits(hf, prompt, prompt_len, cand, cand_len, b, k)
            worst = max(worst, np.abs(got[b, k, : cand_len[b, k]] - ref_c).max())
    print(f"[parity] {name} decode loop (cache) max|diff| = {worst:.2e}")
    assert worst <= TOL


def test_cache_only_chunks_match_full_forward(pair):
    """No prefix: the whole sequence goes through the cache in chunks of 3 then 1 token."""
    name, hf, ours = pair
    ids = _ids(1, 7, seed=4)
    ref = tiny_hf.hf_logits(hf, ids)[0]
    cache = ours.init_cache(1, 1, 8)
    outs = []
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        tok = jnp.asarray(ids[:, None, start:stop])
        pos = jnp.arange(start, stop)[None, None]
        h, cache = ours.extend(ours.embed(tok), pos, jnp.ones(tok.shape, bool), cache=cache, cache_index=start)
        outs.append(np.asarray(ours.logits(h))[0, 0])
    diff = np.abs(np.concatenate(outs) - ref).max()
    assert diff <= TOL


def test_fully_padded_row_is_finite(pair):
    _, _, ours = pair
    ids = jnp.asarray(_ids(2, 5))
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert np.isfinite(np.asarray(ours(ids, attention_mask=mask))).all()


def test_remat_and_gradients_through_prefix(pair):
    """remat=True gives the same logits; gradients flow through PrefixKV into the weights."""
    name, _, ours = pair
    graphdef, state = nnx.split(ours)
    remat_model = nnx.merge(graphdef, state)
    remat_model.config = ours.config.replace(remat=True)
    ids = jnp.asarray(_ids(2, 6))
    np.testing.assert_allclose(np.asarray(remat_model(ids)), np.asarray(ours(ids)), atol=1e-6)

    def loss(model):
        _, prefix = model.prefill(model.embed(ids[:, :4]), jnp.ones((2, 4), bool))
        h, _ = model.extend(
            model.embed(ids[:, None, 4:]), jnp.arange(4, 6)[None, None].repeat(2, 0),
            jnp.ones((2, 1, 2), bool), prefix=prefix,
        )
        return model.logits(h).sum()

    grads = nnx.grad(loss)(remat_model)
    g = grads["layers"]["self_attn"]["k_proj"]["kernel"][...]  # stacked [L, ...]
    assert g.shape[0] == ours.config.num_layers
    # every layer's keys see the prefix: each slice of the stacked gradient is non-zero
    assert (np.abs(np.asarray(g)).reshape(g.shape[0], -1).sum(-1) > 0).all()
    assert np.isfinite(np.asarray(g)).all()
