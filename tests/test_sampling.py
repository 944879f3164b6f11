"""Sampler tests against transformers `generate` on the same tiny random Llama.

The HF model is built with torch, saved, and loaded with `perpo_jax.hf.load_pretrained`, so
the reference and our sampler run the very same weights.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import tiny_hf  # noqa: E402
from perpo_jax import sampling  # noqa: E402
from perpo_jax.hf import load_pretrained  # noqa: E402
from perpo_jax.mesh import make_mesh  # noqa: E402

VOCAB, P, R, PAD = 256, 12, 10, 0
LENGTHS = (5, 9, 12)  # ragged prompts, right-padded to P


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_pretrained(hf_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(0)
    ids = np.zeros((len(LENGTHS), P), np.int32)
    mask = np.zeros((len(LENGTHS), P), bool)
    for b, n in enumerate(LENGTHS):
        ids[b, :n] = rs.randint(3, VOCAB, n)
        mask[b, :n] = True
    return {"prompt_ids": ids, "prompt_mask": mask}


def hf_greedy(hf_model, prompt_ids, eos_id, max_new_tokens=R):
    """transformers greedy continuation of ONE unpadded prompt (list of ids) → list of ids."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=PAD,
        )
    return out[0, ids.shape[1]:].tolist()


def run(model, batch, **kw):
    kw.setdefault("num_samples", 1)
    kw.setdefault("max_new_tokens", R)
    kw.setdefault("eos_id", 2)
    kw.setdefault("rng", jax.random.key(0))
    out = sampling.sample(model, batch, **kw)
    return jax.tree.map(np.asarray, out)


def row(batch, b, trim=False):
    """Prompt b alone as a batch of one (optionally without its padding)."""
    n = int(batch["prompt_mask"][b].sum()) if trim else P
    return {k: v[b : b + 1, :n] for k, v in batch.items()}


def assert_well_formed(res, eos_ids):
    """lengths count tokens up to and including the first EOS; pad after it; mask agrees."""
    b, k, r = res.tokens.shape
    for i in range(b):
        for j in range(k):
            toks, n = res.tokens[i, j], res.lengths[i, j]
            hits = [t for t in range(r) if toks[t] in eos_ids]
            expected = hits[0] + 1 if hits else r
            assert n == expected, (i, j, toks, n)
            assert (toks[n:] == PAD).all()
            np.testing.assert_array_equal(res.mask[i, j], np.arange(r) < n)


def test_greedy_equals_hf_generate_on_ragged_batch(model, hf_model, prompts):
    res = run(model, prompts, num_samples=2, temperature=0.0, rng=None)
    assert res.tokens.shape == (3, 2, R) and res.tokens.dtype == np.int32
    assert res.lengths.shape == (3, 2) and res.lengths.dtype == np.int32
    for b, n in enumerate(LENGTHS):
        ref = hf_greedy(hf_model, prompts["prompt_ids"][b, :n], eos_id=2)
        for k in range(2):
            assert res.tokens[b, k, : len(ref)].tolist() == ref
            assert res.lengths[b, k] == len(ref)
    assert_well_formed(res, {2})


def test_ragged_batch_equals_each_prompt_alone_unpadded(model, prompts):
    batch = run(model, prompts, temperature=0.0, rng=None)
    for b in range(len(LENGTHS)):
        alone = run(model, row(prompts, b, trim=True), temperature=0.0, rng=None)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[b])
        np.testing.assert_array_equal(alone.lengths[0], batch.lengths[b])


def test_eos_stops_each_sample_and_pads_after(model, hf_model, prompts):
    free = run(model, prompts, temperature=0.0, rng=None, eos_id=None)
    assert (free.lengths == R).all()
    eos = int(free.tokens[0, 0, 3])  # row 0 must stop at step 3 (or earlier if repeated)
    res = run(model, prompts, num_samples=2, temperature=0.0, rng=None, eos_id=eos)
    assert_well_formed(res, {eos})
    assert res.lengths[0, 0] <= 4 and res.tokens[0, 0, res.lengths[0, 0] - 1] == eos
    for b, n in enumerate(LENGTHS):
        ref = hf_greedy(hf_model, prompts["prompt_ids"][b, :n], eos_id=eos)
        assert res.tokens[b, 0, : len(ref)].tolist() == ref and res.lengths[b, 0] == len(ref)


def test_all_samples_done_at_first_token(model, prompts):
    free = run(model, prompts, temperature=0.0, rng=None, eos_id=None)
    firsts = sorted({int(t) for t in free.tokens[:, 0, 0]})
    res = run(model, prompts, num_samples=3, temperature=0.0, rng=None, eos_id=firsts)
    assert (res.lengths == 1).all()
    assert (res.tokens[:, :, 1:] == PAD).all()
    np.testing.assert_array_equal(res.tokens[:, :, 0], free.tokens[:, :1, 0].repeat(3, 1))


def test_suppressed_ids_are_never_generated(model, prompts):
    free = run(model, prompts, temperature=0.0, rng=None, eos_id=None)
    banned = sorted({int(t) for t in free.tokens[:, 0, :2].ravel()})  # tokens greedy does pick
    for kw in ({"temperature": 0.0, "rng": None}, {"temperature": 1.0, "rng": jax.random.key(3)}):
        res = run(model, prompts, num_samples=3, eos_id=None, suppress_ids=banned, **kw)
        assert not np.isin(np.asarray(res.tokens), banned).any()


def test_k_shared_prefill_samples_equal_independent_runs(model, prompts):
    rng, k = jax.random.key(7), 4
    res = run(model, prompts, num_samples=k, temperature=1.0, top_p=0.9, rng=rng)
    keys = sampling.sample_keys(rng, len(LENGTHS), k)
    assert len({tuple(t) for t in res.tokens.reshape(-1, R).tolist()}) > 1  # really random
    for b in range(len(LENGTHS)):
        for j in range(k):
            one = run(model, row(prompts, b), temperature=1.0, top_p=0.9, rng=keys[b, j][None, None])
            np.testing.assert_array_equal(one.tokens[0, 0], res.tokens[b, j])
            assert one.lengths[0, 0] == res.lengths[b, j]
    assert_well_formed(res, {2})


def test_tiny_top_p_is_greedy(model, prompts):
    greedy = run(model, prompts, num_samples=2, temperature=0.0, rng=None)
    nucleus = run(model, prompts, num_samples=2, temperature=1.5, top_p=1e-6, rng=jax.random.key(3))
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_same_rng_same_tokens_other_rng_other_tokens(model, prompts):
    a = run(model, prompts, num_samples=2, temperature=1.0, rng=jax.random.key(1))
    b = run(model, prompts, num_samples=2, temperature=1.0, rng=jax.random.key(1))
    c = run(model, prompts, num_samples=2, temperature=1.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    raw = run(model, prompts, num_samples=2, temperature=1.0, rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(raw.tokens, a.tokens)  # raw uint32 keys are wrapped, same stream
    assert (a.tokens != c.tokens).any()


def test_compiles_once_per_shape(model, prompts):
    graphdef, state = nnx.split(model)
    kw = dict(num_samples=3, max_new_tokens=6, eos_id=2, pad_id=PAD)
    run((graphdef, state), prompts, temperature=1.0, top_p=0.8, rng=jax.random.key(0), **kw)
    run((graphdef, state), prompts, temperature=0.7, top_p=0.95, rng=jax.random.key(5), **kw)
    spec = sampling.SamplerSpec(3, 6, False, (2,), PAD, None, False)
    assert sampling.compiled_sampler(graphdef, spec)._cache_size() == 1


def test_mesh_2x2x2_matches_unsharded(hf_dir, model):
    mesh = make_mesh((2, 2, 2))
    sharded_model = load_pretrained(hf_dir, dtype=jnp.float32, mesh=mesh)
    rs = np.random.RandomState(1)
    lengths = (3, 7, 12, 10)
    ids = np.where(np.arange(P)[None] < np.array(lengths)[:, None], rs.randint(3, VOCAB, (4, P)), 0)
    batch = {"prompt_ids": ids.astype(np.int32), "prompt_mask": ids > 0}
    for kw in (dict(temperature=0.0, rng=None), dict(temperature=1.0, top_p=0.9, rng=jax.random.key(4))):
        plain = run(model, batch, num_samples=2, **kw)
        out = sampling.sample(sharded_model, batch, num_samples=2, max_new_tokens=R, eos_id=2, mesh=mesh, **kw)
        assert out.tokens.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(out.tokens), plain.tokens)
        np.testing.assert_array_equal(np.asarray(out.lengths), plain.lengths)


def test_draw_tokens_follows_tempered_nucleus_distribution():
    logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.07, 0.03]))[None, None].repeat(4000, axis=1)
    keys = sampling.sample_keys(jax.random.key(0), 1, 4000)
    for temperature, top_p in ((1.0, 1.0), (2.0, 1.0), (1.0, 0.7)):
        draws = np.asarray(sampling.draw_tokens(logits, keys, jnp.int32(0), temperature, top_p, False))
        freq = np.bincount(draws.ravel(), minlength=5) / draws.size
        probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03]) ** (1 / temperature)
        # mass before token i: 0, .5, .75, ... → top_p 0.7 keeps tokens 0 and 1
        keep = np.cumsum(probs / probs.sum()) - probs / probs.sum() < top_p
        expected = np.where(keep, probs, 0) / np.where(keep, probs, 0).sum()
        np.testing.assert_allclose(freq, expected, atol=0.03)
    # masked tokens (suppressed ids, the nucleus' cut) at the front, middle and end of the
    # vocabulary are never drawn, whatever the uniform
    probs = np.array([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    with np.errstate(divide="ignore"):
        masked = jnp.asarray(np.log(probs), jnp.float32)[None, None].repeat(4000, axis=1)
    draws = np.asarray(sampling.draw_tokens(masked, keys, jnp.int32(1), 1.0, 1.0, False))
    np.testing.assert_allclose(np.bincount(draws.ravel(), minlength=6) / draws.size, probs,
                               atol=0.03)
    assert set(np.unique(draws)) == {1, 3, 4}


def test_top_p_filter_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, jnp.float32(0.6))))
    np.testing.assert_array_equal(kept, [[False, True, False, True]])
    assert np.isfinite(np.asarray(sampling.top_p_filter(logits, jnp.float32(1.0)))).all()
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, jnp.float32(1e-6))))
    np.testing.assert_array_equal(kept, [[False, True, False, False]])


def test_bad_inputs_name_the_problem(model, prompts):
    with pytest.raises(KeyError, match="prompt_mask"):
        sampling.sample(model, {"prompt_ids": prompts["prompt_ids"]}, num_samples=1,
                        max_new_tokens=2, rng=None, temperature=0.0, eos_id=2)
    empty = dict(prompts, prompt_mask=prompts["prompt_mask"] & (np.arange(3) != 1)[:, None])
    with pytest.raises(ValueError, match="no real token"):
        run(model, empty, temperature=0.0, rng=None)
    with pytest.raises(ValueError, match="rng is required"):
        run(model, prompts, temperature=1.0, rng=None)
    with pytest.raises(ValueError, match="per-sample keys"):
        run(model, prompts, rng=jax.random.split(jax.random.key(0), 5))


def test_llava_greedy_with_image_equals_hf_generate(tmp_path):
    hf = tiny_hf.llava(tiny_hf.llama_config(), tiny_hf.clip_config(), seed=3)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=jnp.float32)
    rows = [tiny_hf.llava_inputs(hf, batch=1, before=2 + 3 * i, after=4 - i, seed=i) for i in range(2)]
    width = max(ids.shape[1] for ids, _ in rows)
    ids = np.zeros((2, width), np.int32)
    for b, (row_ids, _) in enumerate(rows):
        ids[b, : row_ids.shape[1]] = row_ids[0]
    pixels = np.concatenate([px for _, px in rows])
    batch = {"prompt_ids": ids, "prompt_mask": ids > 0, "pixel_values": pixels}
    res = run(model, batch, num_samples=2, temperature=0.0, rng=None, eos_id=None)
    for b, (row_ids, px) in enumerate(rows):
        ids_t = torch.as_tensor(row_ids, dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(ids_t, pixel_values=torch.as_tensor(px), attention_mask=torch.ones_like(ids_t),
                              do_sample=False, max_new_tokens=R, min_new_tokens=R, pad_token_id=PAD)
        ref = out[0, ids_t.shape[1]:].tolist()
        assert res.tokens[b, 0].tolist() == ref and res.tokens[b, 1].tolist() == ref
    other_image = run(model, dict(batch, pixel_values=-pixels), temperature=0.0, rng=None, eos_id=None)
    assert (other_image.tokens[:, 0] != res.tokens[:, 0]).any()  # the image reaches the sampler
