"""Causal attention in query blocks (`grouped_attention(causal=True)`) equals the full masked
attention, values and gradients, with padding, GQA and a length that is not a block multiple."""
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

    (_, full), g_full = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
    (_, blocked), g_blocked = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
    np.testing.assert_allclose(blocked, full, atol=1e-5)
    for a, b in zip(g_blocked, g_full):
        np.testing.assert_allclose(a, b, atol=1e-4)
