"""Listwise losses vs independent numpy implementations written with explicit pair loops."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from perpo_jax.losses import LOSSES, dpo_loss, lipo_lambda_loss, lipo_loss, perpo_loss

BETA = 0.1


# ----------------------------------------------------------------------------- numpy references
def np_log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def np_list_terms(pol, ref, rew, mask):
    """Real candidates of one list as python lists: s, rewards, original indices."""
    idx = [k for k in range(len(mask)) if mask[k]]
    s = [float(pol[k]) - float(ref[k]) for k in idx]
    r = [float(rew[k]) for k in idx]
    return s, r, idx


def np_pairs(r):
    return [(i, j) for i in range(len(r)) for j in range(len(r)) if r[i] > r[j]]


def np_perpo_list(s, r, beta, gamma):
    pairs = np_pairs(r)
    if not pairs:
        return None
    weights = [(r[i] - r[j]) ** gamma for i, j in pairs]
    total = sum(weights)
    return -sum(w / total * np_log_sigmoid(beta * (s[i] - s[j])) for w, (i, j) in zip(weights, pairs))


def np_lipo_lambda_list(s, r, beta):
    pairs = np_pairs(r)
    if not pairs:
        return None
    order = sorted(range(len(s)), key=lambda k: (-s[k], k))  # descending s, ties by position
    tau = {k: rank + 1 for rank, k in enumerate(order)}
    loss = 0.0
    for i, j in pairs:
        gain = abs((2.0 ** r[i] - 1.0) - (2.0 ** r[j] - 1.0))
        disc = abs(1.0 / math.log2(1 + tau[i]) - 1.0 / math.log2(1 + tau[j]))
        loss -= gain * disc * np_log_sigmoid(beta * (s[i] - s[j]))
    return loss


def np_dpo_list(s, r, beta, eps):
    if len(r) < 2:
        return None
    best = max(range(len(r)), key=lambda k: (r[k], -k))   # first index among ties
    worst = min(range(len(r)), key=lambda k: (r[k], k))
    if r[best] <= r[worst]:
        return None
    d = beta * (s[best] - s[worst])
    return -(1 - eps) * np_log_sigmoid(d) - eps * np_log_sigmoid(-d)


def np_batch(list_loss, pol, ref, rew, mask, beta):
    """Mean of list losses over valid lists + metrics, with the documented definitions."""
    losses, chosen, rejected, n_pairs, n_correct = [], [], [], 0, 0
    for b in range(pol.shape[0]):
        s, r, _ = np_list_terms(pol[b], ref[b], rew[b], mask[b])
        loss = list_loss(s, r)
        if loss is None:
            continue
        losses.append(loss)
        best = max(range(len(r)), key=lambda k: (r[k], -k))
        worst = min(range(len(r)), key=lambda k: (r[k], k))
        chosen.append(beta * s[best])
        rejected.append(beta * s[worst])
        for i, j in np_pairs(r):
            n_pairs += 1
            n_correct += s[i] > s[j]
    n = len(losses)
    mean = (lambda xs: sum(xs) / n) if n else (lambda xs: 0.0)
    return mean(losses), {
        "pair_accuracy": n_correct / n_pairs if n_pairs else 0.0,
        "chosen_reward": mean(chosen),
        "rejected_reward": mean(rejected),
        "margin": mean([c - rj for c, rj in zip(chosen, rejected)]),
        "num_valid_lists": float(n),
    }


# ----------------------------------------------------------------------------- helpers
def random_batch(rng, b=6, k=7, tie_levels=4):
    """Ragged lists with many reward ties: rewards drawn from `tie_levels` values."""
    pol = rng.normal(-40.0, 15.0, size=(b, k)).astype(np.float32)
    ref = (pol + rng.normal(0.0, 8.0, size=(b, k))).astype(np.float32)
    rew = (rng.integers(0, tie_levels, size=(b, k)) / (tie_levels - 1)).astype(np.float32)
    lengths = rng.integers(0, k + 1, size=b)
    lengths[0] = k  # at least one full list
    mask = np.arange(k)[None, :] < lengths[:, None]
    perm = rng.permuted(np.tile(np.arange(k), (b, 1)), axis=1)  # padding not always at the end
    mask = np.take_along_axis(mask, perm, axis=1)
    return pol, ref, rew, mask


def assert_matches(got, want, rtol=2e-5, atol=2e-6):
    loss, metrics = got
    want_loss, want_metrics = want
    np.testing.assert_allclose(float(loss), want_loss, rtol=rtol, atol=atol)
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        assert metrics[name].dtype == jnp.float32, name
        np.testing.assert_allclose(float(metrics[name]), value, rtol=rtol, atol=atol, err_msg=name)


REFERENCES = {
    "perpo": lambda beta, **kw: functools.partial(
        lambda s, r, g: np_perpo_list(s, r, beta, g), g=kw.get("gamma", 0.5)),
    "lipo": lambda beta, **kw: lambda s, r: np_perpo_list(s, r, beta, 0.0),
    "lipo_lambda": lambda beta, **kw: lambda s, r: np_lipo_lambda_list(s, r, beta),
    "dpo": lambda beta, **kw: lambda s, r: np_dpo_list(s, r, beta, kw.get("label_smoothing", 0.0)),
}

CASES = [
    ("perpo", {"gamma": 0.5}), ("perpo", {"gamma": 0.0}), ("perpo", {"gamma": 1.0}),
    ("perpo", {"gamma": 2.0}), ("lipo", {}), ("lipo_lambda", {}),
    ("dpo", {"label_smoothing": 0.0}), ("dpo", {"label_smoothing": 0.2}),
]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference(name, kwargs, seed):
    rng = np.random.default_rng(seed)
    pol, ref, rew, mask = random_batch(rng)
    beta = [0.1, 0.5, 1.0][seed]
    got = LOSSES[name](pol, ref, rew, mask, beta=beta, **kwargs)
    want = np_batch(REFERENCES[name](beta, **kwargs), pol, ref, rew, mask, beta)
    assert want[1]["num_valid_lists"] >= 1
    assert_matches(got, want)


_jit_perpo = jax.jit(functools.partial(perpo_loss, beta=0.3, gamma=0.5))
_jit_lambda = jax.jit(functools.partial(lipo_lambda_loss, beta=0.3))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 5))
def test_hypothesis_random_lists(seed, tie_levels):
    rng = np.random.default_rng(seed)
    pol, ref, rew, mask = random_batch(rng, b=4, k=5, tie_levels=tie_levels)
    want = np_batch(REFERENCES["perpo"](0.3, gamma=0.5), pol, ref, rew, mask, 0.3)
    assert_matches(_jit_perpo(pol, ref, rew, mask), want)
    want = np_batch(REFERENCES["lipo_lambda"](0.3), pol, ref, rew, mask, 0.3)
    assert_matches(_jit_lambda(pol, ref, rew, mask), want)


@pytest.mark.parametrize("name", ["perpo", "lipo", "lipo_lambda", "dpo"])
def test_permutation_invariance(name):
    rng = np.random.default_rng(7)
    pol, ref, rew, mask = random_batch(rng, tie_levels=4)
    if name == "dpo":  # best/worst must be unique for the choice to be order-free
        rew = rng.permuted(np.tile(np.linspace(0, 1, 7, dtype=np.float32), (6, 1)), axis=1)
    perm = rng.permuted(np.tile(np.arange(7), (6, 1)), axis=1)
    shuffled = [np.take_along_axis(x, perm, axis=1) for x in (pol, ref, rew, mask)]
    loss, metrics = LOSSES[name](pol, ref, rew, mask)
    loss_p, metrics_p = LOSSES[name](*shuffled)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    for key in ("pair_accuracy", "num_valid_lists"):
        np.testing.assert_allclose(float(metrics_p[key]), float(metrics[key]), rtol=1e-6)


def test_gamma_zero_is_uniform_mean_over_pairs():
    rng = np.random.default_rng(3)
    pol, ref, rew, mask = random_batch(rng, tie_levels=3)
    per_list = []
    for b in range(pol.shape[0]):
        s, r, _ = np_list_terms(pol[b], ref[b], rew[b], mask[b])
        terms = [-np_log_sigmoid(BETA * (s[i] - s[j])) for i, j in np_pairs(r)]
        if terms:
            per_list.append(np.mean(terms))
    loss, _ = perpo_loss(pol, ref, rew, mask, beta=BETA, gamma=0.0)
    np.testing.assert_allclose(float(loss), np.mean(per_list), rtol=1e-5)
    np.testing.assert_allclose(float(lipo_loss(pol, ref, rew, mask, beta=BETA)[0]), float(loss))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_two_candidates_perpo_equals_dpo(gamma):
    rng = np.random.default_rng(4)
    pol, ref = rng.normal(-30, 10, (2, 16, 2)).astype(np.float32)
    rew = rng.uniform(0, 1, (16, 2)).astype(np.float32)
    mask = np.ones((16, 2), bool)
    loss_p, metrics_p = perpo_loss(pol, ref, rew, mask, beta=0.2, gamma=gamma)
    loss_d, metrics_d = dpo_loss(pol, ref, rew, mask, beta=0.2)
    np.testing.assert_allclose(float(loss_p), float(loss_d), rtol=1e-6)
    for key in metrics_d:
        np.testing.assert_allclose(float(metrics_p[key]), float(metrics_d[key]), rtol=1e-6)
    # ... and classic DPO written out: chosen = higher reward.
    chosen = np.where(rew[:, 0] > rew[:, 1], 0, 1)
    d = 0.2 * ((pol - ref)[np.arange(16), chosen] - (pol - ref)[np.arange(16), 1 - chosen])
    np.testing.assert_allclose(float(loss_d), np.mean(np.logaddexp(0.0, -d)), rtol=1e-5)


@pytest.mark.parametrize("name", ["perpo", "lipo", "lipo_lambda", "dpo"])
def test_gradient_sign_and_finiteness(name):
    """The gradient pushes the best candidate's log-prob up and the worst one's down."""
    rng = np.random.default_rng(5)
    pol, ref, rew, mask = random_batch(rng, b=4, k=6, tie_levels=50)
    rew = rng.permuted(np.tile(np.linspace(0.1, 0.9, 6, dtype=np.float32), (4, 1)), axis=1)
    mask[:] = True
    mask[2, :2] = False
    grad = jax.grad(lambda p: LOSSES[name](p, ref, rew, mask)[0])(jnp.asarray(pol))
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[~mask] == 0.0)
    for b in range(4):
        masked_rew = np.where(mask[b], rew[b], np.nan)
        assert grad[b, np.nanargmax(masked_rew)] < 0, (b, grad[b])
        assert grad[b, np.nanargmin(masked_rew)] > 0, (b, grad[b])
    # The reference model gets the opposite push and is treated like the policy.
    grad_ref = jax.grad(lambda r: LOSSES[name](pol, r, rew, mask)[0])(jnp.asarray(ref))
    np.testing.assert_allclose(np.asarray(grad_ref), -grad, rtol=1e-6, atol=1e-9)


def test_lipo_lambda_rank_is_constant_for_the_gradient():
    pol = jnp.array([[-10.0, -12.0, -11.0, -15.0]])
    ref = jnp.zeros_like(pol)
    rew = jnp.array([[0.9, 0.1, 0.5, 0.3]])
    mask = jnp.ones((1, 4), bool)
    grad = jax.grad(lambda p: lipo_lambda_loss(p, ref, rew, mask, beta=1.0)[0])(pol)
    # Small central differences do not change the ranks, so they equal the analytic gradient.
    eps = 1e-2
    for k in range(4):
        e = jnp.zeros_like(pol).at[0, k].set(eps)
        fd = (lipo_lambda_loss(pol + e, ref, rew, mask, beta=1.0)[0]
              - lipo_lambda_loss(pol - e, ref, rew, mask, beta=1.0)[0]) / (2 * eps)
        np.testing.assert_allclose(float(grad[0, k]), float(fd), rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["perpo", "lipo", "lipo_lambda", "dpo"])
def test_jit_and_vmap_of_public_function(name):
    rng = np.random.default_rng(6)
    batches = [random_batch(rng, b=3, k=5) for _ in range(4)]
    stacked = [np.stack(x) for x in zip(*batches)]  # [G, B, K]
    fn = LOSSES[name]
    eager = [fn(*batch) for batch in batches]
    jitted = jax.jit(fn)(*batches[0])
    np.testing.assert_allclose(float(jitted[0]), float(eager[0][0]), rtol=1e-6)
    vm_loss, vm_metrics = jax.jit(jax.vmap(fn))(*stacked)
    np.testing.assert_allclose(np.asarray(vm_loss), [float(e[0]) for e in eager], rtol=1e-6)
    assert vm_metrics["num_valid_lists"].shape == (4,)


DEGENERATE = {
    "all_tied": (np.full((1, 4), 0.5, np.float32), np.ones((1, 4), bool)),
    "all_masked": (np.array([[0.9, 0.1, 0.5, 0.3]], np.float32), np.zeros((1, 4), bool)),
    "single_candidate": (np.array([[0.9, 0.1, 0.5, 0.3]], np.float32),
                         np.array([[False, True, False, False]])),
    "tied_real_untied_padding": (np.array([[0.2, 0.2, 0.9, 0.0]], np.float32),
                                 np.array([[True, True, False, False]])),
}


@pytest.mark.parametrize("name", ["perpo", "lipo", "lipo_lambda", "dpo"])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_invalid_batch_gives_zero_loss_and_zero_gradient(name, case):
    rew, mask = DEGENERATE[case]
    # Padding holds -inf / NaN log-probs, as a careless caller might leave them.
    pol = np.where(mask, -20.0, -np.inf).astype(np.float32)
    ref = np.where(mask, -21.0, np.nan).astype(np.float32)
    fn = jax.jit(lambda p: LOSSES[name](p, ref, rew, mask))
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(pol))
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["num_valid_lists"]) == 0.0


@pytest.mark.parametrize("name", ["perpo", "lipo", "lipo_lambda", "dpo"])
def test_invalid_lists_are_left_out_of_the_mean(name):
    rng = np.random.default_rng(8)
    pol, ref, _, _ = random_batch(rng, b=3, k=4)
    rew = np.array([[0.9, 0.1, 0.5, 0.3], [0.5] * 4, [0.9, 0.1, 0.5, 0.3]], np.float32)
    mask = np.array([[True] * 4, [True] * 4, [True, False, False, False]])
    pol[2, 1:] = np.nan  # padding of the single-candidate list must not leak anywhere
    loss, metrics = LOSSES[name](pol, ref, rew, mask)
    loss_one, _ = LOSSES[name](pol[:1], ref[:1], rew[:1], mask[:1])
    np.testing.assert_allclose(float(loss), float(loss_one), rtol=1e-6)
    assert float(metrics["num_valid_lists"]) == 1.0
    grad = jax.grad(lambda p: LOSSES[name](p, ref, rew, mask)[0])(jnp.asarray(pol))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[1:] == 0.0)


def test_zero_gap_pairs_and_half_power_gradient_are_finite():
    """gamma=0.5 with tied rewards: d/dx x^0.5 at 0 must never be evaluated."""
    pol = jnp.array([[-1.0, -2.0, -3.0]])
    rew = jnp.array([[0.5, 0.5, 0.1]])
    mask = jnp.ones((1, 3), bool)
    grad = jax.grad(lambda p, r: perpo_loss(p, jnp.zeros_like(p), r, mask)[0],
                    argnums=(0, 1))(pol, rew)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad)


def test_low_precision_inputs_use_float32_math():
    rng = np.random.default_rng(9)
    pol, ref, rew, mask = random_batch(rng)
    loss_bf16, metrics = perpo_loss(jnp.asarray(pol, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16),
                                    jnp.asarray(rew, jnp.bfloat16), mask)
    assert loss_bf16.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_shape_mismatch_names_the_tensor():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="rewards"):
        perpo_loss(x, x, np.zeros((2, 4), np.float32), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="policy_logps"):
        dpo_loss(np.zeros(3), np.zeros(3), np.zeros(3), np.ones(3, bool))
