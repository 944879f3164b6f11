"""Attention (`grouped_attention`, a hand-written VJP) against autodiff of a textbook formula
written here, values and gradients; causal query blocks against the full masked attention and
the formula, with padding, GQA and a length that is not a block multiple."""
import jax
import jax.numpy as jnp
import numpy as np

from perpo_jax.models.decoder import CAUSAL_BLOCK, grouped_attention


def test_causal_blocks_match_full_attention():
    t = 2 * CAUSAL_BLOCK + 45  # three blocks, the last one partial
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 1, t, n, 8)), jnp.float32) for n in (4, 2, 2))
    valid = np.ones((2, t), bool)
    valid[1, t - 30:] = False  # right padding
    mask = jnp.asarray(valid)[:, None, None, :] & jnp.tril(jnp.ones((t, t), bool))[None, None]

    def loss(q, k, v, causal):
        out = grouped_attention(q, k, v, mask, causal=causal)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    def reference_loss(q, k, v):
        out = _reference_attention(q, k, v, mask)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    (_, full), g_full = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
    (_, blocked), g_blocked = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
    (_, ref), g_ref = jax.value_and_grad(reference_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(blocked, full, atol=1e-5)
    np.testing.assert_allclose(blocked, ref, atol=1e-5)
    for name, a, b, r in zip("qkv", g_blocked, g_full, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(a, r, atol=1e-4, err_msg=name)


def _reference_attention(q, k, v, own_mask, prefix=None):
    """The textbook formula, differentiated by autodiff: prefix keys tiled over G, both segments
    concatenated, one masked float32 softmax."""
    b, g, t, n, h = q.shape
    rep = n // k.shape[-2]
    keys, values, mask = k, v, jnp.broadcast_to(own_mask, (b, g, t, k.shape[2]))
    if prefix is not None:
        k_pre, v_pre, mask_pre = prefix
        tile = lambda x: jnp.broadcast_to(x[:, None], (b, g) + x.shape[1:])  # noqa: E731
        keys = jnp.concatenate([tile(k_pre), keys], axis=2)
        values = jnp.concatenate([tile(v_pre), values], axis=2)
        mask = jnp.concatenate([jnp.broadcast_to(mask_pre[:, None, None, :], (b, g, t, mask_pre.shape[1])), mask], -1)
    keys, values = jnp.repeat(keys, rep, axis=3), jnp.repeat(values, rep, axis=3)
    scores = jnp.einsum("bgtnh,bgsnh->bgnts", q, keys) / np.sqrt(h)
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)
    return jnp.einsum("bgnts,bgsnh->bgtnh", jax.nn.softmax(scores, axis=-1), values)


def test_attention_gradients_match_autodiff_of_the_textbook_formula():
    """The hand-written VJP (saved probabilities, no transposed score tensors) against autodiff
    of an independent formula: GQA, padding, G > 1 groups, with and without a shared prefix."""
    rng = np.random.default_rng(1)
    b, g, t, s, p, h = 2, 3, 5, 7, 6, 8
    q = jnp.asarray(rng.normal(size=(b, g, t, 4, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, g, s, 2, h)), jnp.float32) for _ in range(2))
    own = rng.random((b, g, t, s)) < 0.7
    own[..., 0] = True  # every query sees at least one own key
    own = jnp.asarray(own)
    pre_mask = np.ones((b, p), bool)
    pre_mask[1, :2] = False  # left-padded prompt
    prefix = tuple(jnp.asarray(rng.normal(size=(b, p, 2, h)), jnp.float32) for _ in range(2))
    prefix = prefix + (jnp.asarray(pre_mask),)
    weights = jnp.asarray(rng.normal(size=(b, g, t, 4, h)), jnp.float32)
    for pre in (None, prefix):
        def loss(fn, q, k, v, k_pre, v_pre):
            pfx = None if pre is None else (k_pre, v_pre, pre[2])
            return (fn(q, k, v, own, pfx) * weights).sum()
        args = (q, k, v) + ((prefix[0], prefix[1]))
        ours = jax.grad(lambda *a: loss(grouped_attention, *a), argnums=range(5))(*args)
        ref = jax.grad(lambda *a: loss(_reference_attention, *a), argnums=range(5))(*args)
        np.testing.assert_allclose(loss(grouped_attention, *args), loss(_reference_attention, *args), rtol=1e-5)
        for name, a, r in zip(("q", "k", "v", "k_prefix", "v_prefix"), ours, ref):
            np.testing.assert_allclose(a, r, atol=2e-5, err_msg=name)
