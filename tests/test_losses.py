"""Listwise losses vs independent numpy implementations written with explicit pair loops
(reference losses on s = policy - ref; SimPO / ORPO on token-mean log-probs, written from the
papers' formulas with python floats)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from perpo_jax.losses import (LOSSES, ORPO_MAX_MEAN_LOGP, REFERENCE_FREE_LOSSES, dpo_loss, ipo_loss,
                              lipo_lambda_loss, lipo_loss, orpo_loss, perpo_loss, simpo_loss)

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


def np_ipo_list(s, r, beta):
    """Azar et al. 2023 eq. 17 on the best-vs-worst pair: (h - 1/(2 tau))^2, tau = beta."""
    if len(r) < 2:
        return None
    best = max(range(len(r)), key=lambda k: (r[k], -k))
    worst = min(range(len(r)), key=lambda k: (r[k], k))
    if r[best] <= r[worst]:
        return None
    return (s[best] - s[worst] - 1.0 / (2.0 * beta)) ** 2


def np_best_worst(r):
    if len(r) < 2:
        return None
    best = max(range(len(r)), key=lambda k: (r[k], -k))
    worst = min(range(len(r)), key=lambda k: (r[k], k))
    return None if r[best] <= r[worst] else (best, worst)


def np_simpo_list(m, r, beta, ratio):
    """Meng et al. 2024: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)."""
    pair = np_best_worst(r)
    if pair is None:
        return None
    w, l = pair
    gamma = ratio * beta
    return -np_log_sigmoid(beta * m[w] - beta * m[l] - gamma)


def np_log_odds(m):
    p = math.exp(m)  # P(y|x) = exp(token-mean log-prob)
    return math.log(p / (1.0 - p))


def np_orpo_list(m, r, lam):
    """Hong et al. 2024: NLL_w + lam * -log sigma(log(odds_w / odds_l)), odds = P / (1 - P)."""
    pair = np_best_worst(r)
    if pair is None:
        return None
    w, l = pair
    return -m[w] - lam * np_log_sigmoid(np_log_odds(m[w]) - np_log_odds(m[l]))


def np_reduce(per_list, implicit, extras=None):
    """Mean of list losses over valid lists + metrics, with the documented definitions.

    per_list: (loss or None, score, rewards) of each list; implicit(score) -> implicit rewards;
    extras(score, best) -> {name: value} averaged over valid lists like the rewards.
    """
    losses, chosen, rejected, n_pairs, n_correct, extra = [], [], [], 0, 0, {}
    for loss, s, r in per_list:
        if loss is None:
            continue
        losses.append(loss)
        best = max(range(len(r)), key=lambda k: (r[k], -k))
        worst = min(range(len(r)), key=lambda k: (r[k], k))
        rew = implicit(s)
        chosen.append(rew[best])
        rejected.append(rew[worst])
        for name, value in (extras(s, best) if extras else {}).items():
            extra.setdefault(name, []).append(value)
        for i, j in np_pairs(r):
            n_pairs += 1
            n_correct += s[i] > s[j]
    n = len(losses)
    mean = (lambda xs: sum(xs) / n) if n else (lambda xs: 0.0)
    metrics = {
        "pair_accuracy": n_correct / n_pairs if n_pairs else 0.0,
        "chosen_reward": mean(chosen),
        "rejected_reward": mean(rejected),
        "margin": mean([c - rj for c, rj in zip(chosen, rejected)]),
        "num_valid_lists": float(n),
    }
    metrics.update({name: mean(values) for name, values in extra.items()})
    return mean(losses), metrics


def np_batch(list_loss, pol, ref, rew, mask, beta):
    """Reference losses: score s = policy - ref, implicit reward beta * s."""
    per_list = []
    for b in range(pol.shape[0]):
        s, r, _ = np_list_terms(pol[b], ref[b], rew[b], mask[b])
        per_list.append((list_loss(s, r), s, r))
    return np_reduce(per_list, lambda s: [beta * x for x in s])


def np_mean_logps(pol, lengths, mask):
    """Token-mean log-probs of the real candidates of one list (python floats)."""
    idx = [k for k in range(len(mask)) if mask[k]]
    return [float(pol[k]) / max(int(lengths[k]), 1) for k in idx]


def np_batch_reference_free(name, pol, lengths, rew, mask, **kw):
    per_list = []
    for b in range(pol.shape[0]):
        m = np_mean_logps(pol[b], lengths[b], mask[b])
        r = [float(rew[b, k]) for k in range(len(mask[b])) if mask[b, k]]
        if name == "simpo":
            per_list.append((np_simpo_list(m, r, kw["beta"], kw["gamma_beta_ratio"]), m, r))
        else:
            per_list.append((np_orpo_list(m, r, kw["lam"]), m, r))
    if name == "simpo":
        return np_reduce(per_list, lambda m: [kw["beta"] * x for x in m])
    loss, metrics = np_reduce(per_list, lambda m: [np_log_odds(x) for x in m],
                              lambda m, best: {"nll": -m[best]})
    metrics.setdefault("nll", 0.0)  # a batch with no valid list: every metric is 0
    return loss, metrics


# ----------------------------------------------------------------------------- helpers
def random_reference_free_batch(rng, b=6, k=7, tie_levels=4, max_len=12):
    """Ragged lists with ties; real candidates have 1..max_len tokens and token-mean log-probs
    in [-3, -0.02]; padding holds length 0 and -inf / NaN log-probs."""
    _, _, rew, mask = random_batch(rng, b, k, tie_levels)
    lengths = rng.integers(1, max_len + 1, size=(b, k))
    mean = rng.uniform(-3.0, -0.02, size=(b, k))
    pol = (mean * lengths).astype(np.float32)
    pol = np.where(mask, pol, np.where(rng.uniform(size=(b, k)) < 0.5, -np.inf, np.nan))
    return pol.astype(np.float32), np.where(mask, lengths, 0).astype(np.int32), rew, mask


def call_loss(name, pol, ref, rew, mask, lengths=None, **kwargs):
    """LOSSES[name] with the arguments its family takes (reference-free: no ref, lengths)."""
    if name in REFERENCE_FREE_LOSSES:
        return LOSSES[name](pol, rew, mask, lengths=lengths, **kwargs)
    return LOSSES[name](pol, ref, rew, mask, **kwargs)


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
    "ipo": lambda beta, **kw: lambda s, r: np_ipo_list(s, r, beta),
}

CASES = [
    ("perpo", {"gamma": 0.5}), ("perpo", {"gamma": 0.0}), ("perpo", {"gamma": 1.0}),
    ("perpo", {"gamma": 2.0}), ("lipo", {}), ("lipo_lambda", {}),
    ("dpo", {"label_smoothing": 0.0}), ("dpo", {"label_smoothing": 0.2}),
    ("dpo", {"label_smoothing": 0.45}), ("ipo", {}),
]
REFERENCE_FREE_CASES = [
    ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}), ("simpo", {"beta": 2.5, "gamma_beta_ratio": 0.0}),
    ("simpo", {"beta": 0.1, "gamma_beta_ratio": 1.0}), ("orpo", {"lam": 0.1}), ("orpo", {"lam": 1.0}),
    ("orpo", {"lam": 0.0}),
]
ALL_LOSSES = sorted(LOSSES)


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


@pytest.mark.parametrize("name,kwargs", REFERENCE_FREE_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_free_matches_numpy_reference(name, kwargs, seed):
    rng = np.random.default_rng(seed)
    pol, lengths, rew, mask = random_reference_free_batch(rng)
    got = LOSSES[name](pol, rew, mask, lengths=lengths, **kwargs)
    want = np_batch_reference_free(name, pol, lengths, rew, mask, **kwargs)
    assert want[1]["num_valid_lists"] >= 1
    assert_matches(got, want, rtol=5e-5, atol=5e-6)


_jit_perpo = jax.jit(functools.partial(perpo_loss, beta=0.3, gamma=0.5))
_jit_lambda = jax.jit(functools.partial(lipo_lambda_loss, beta=0.3))
_jit_ipo = jax.jit(functools.partial(ipo_loss, beta=0.3))
_jit_simpo = jax.jit(functools.partial(simpo_loss, beta=2.0, gamma_beta_ratio=0.5))
_jit_orpo = jax.jit(functools.partial(orpo_loss, lam=0.5))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 5))
def test_hypothesis_random_lists(seed, tie_levels):
    rng = np.random.default_rng(seed)
    pol, ref, rew, mask = random_batch(rng, b=4, k=5, tie_levels=tie_levels)
    want = np_batch(REFERENCES["perpo"](0.3, gamma=0.5), pol, ref, rew, mask, 0.3)
    assert_matches(_jit_perpo(pol, ref, rew, mask), want)
    want = np_batch(REFERENCES["lipo_lambda"](0.3), pol, ref, rew, mask, 0.3)
    assert_matches(_jit_lambda(pol, ref, rew, mask), want)
    want = np_batch(REFERENCES["ipo"](0.3), pol, ref, rew, mask, 0.3)
    assert_matches(_jit_ipo(pol, ref, rew, mask), want, rtol=5e-5, atol=5e-5)
    pol, lengths, rew, mask = random_reference_free_batch(rng, b=4, k=5, tie_levels=tie_levels)
    want = np_batch_reference_free("simpo", pol, lengths, rew, mask, beta=2.0, gamma_beta_ratio=0.5)
    assert_matches(_jit_simpo(pol, rew, mask, lengths=lengths), want, rtol=5e-5, atol=5e-6)
    want = np_batch_reference_free("orpo", pol, lengths, rew, mask, lam=0.5)
    assert_matches(_jit_orpo(pol, rew, mask, lengths=lengths), want, rtol=5e-5, atol=5e-6)


def lengths_like(mask, rng=None):
    """Token counts for a [B, K] mask: 1..9 on real candidates, 0 on padding."""
    rng = rng or np.random.default_rng(0)
    return np.where(mask, rng.integers(1, 10, size=mask.shape), 0).astype(np.int32)


def reference_free_logps(pol, mask):
    """Make a reference batch's summed log-probs plausible for token-mean ones (< 0, not tiny)."""
    return np.where(mask, -np.abs(pol) - 1.0, pol).astype(np.float32)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_permutation_invariance(name):
    rng = np.random.default_rng(7)
    pol, ref, rew, mask = random_batch(rng, tie_levels=4)
    lengths = lengths_like(mask, rng)
    if name in ("dpo", "ipo", "simpo", "orpo"):  # best/worst must be unique to be order-free
        rew = rng.permuted(np.tile(np.linspace(0, 1, 7, dtype=np.float32), (6, 1)), axis=1)
    perm = rng.permuted(np.tile(np.arange(7), (6, 1)), axis=1)
    shuffled = [np.take_along_axis(x, perm, axis=1) for x in (pol, ref, rew, mask, lengths)]
    loss, metrics = call_loss(name, pol, ref, rew, mask, lengths)
    loss_p, metrics_p = call_loss(name, *shuffled)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    # with tied rewards the chosen / rejected candidate is the first in list order
    keys = metrics if name in ("dpo", "ipo", "simpo", "orpo") else ("pair_accuracy", "num_valid_lists")
    for key in keys:
        np.testing.assert_allclose(float(metrics_p[key]), float(metrics[key]), rtol=1e-5,
                                   atol=1e-6, err_msg=key)


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


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_is_dpo_with_the_label_flipped_with_probability_eps(eps):
    """cDPO (Mitchell 2023): the expected DPO loss when the label is wrong with prob. eps."""
    rng = np.random.default_rng(12)
    pol, ref = rng.normal(-30, 10, (2, 16, 2)).astype(np.float32)
    rew = rng.permuted(np.tile(np.array([0.2, 0.8], np.float32), (16, 1)), axis=1)
    mask = np.ones((16, 2), bool)
    smooth, _ = dpo_loss(pol, ref, rew, mask, beta=0.3, label_smoothing=eps)
    right, _ = dpo_loss(pol, ref, rew, mask, beta=0.3)
    flipped, _ = dpo_loss(pol, ref, 1.0 - rew, mask, beta=0.3)
    np.testing.assert_allclose(float(smooth), (1 - eps) * float(right) + eps * float(flipped),
                               rtol=1e-5)


def test_ipo_two_candidates_is_the_papers_squared_loss():
    rng = np.random.default_rng(13)
    pol, ref = rng.normal(-30, 10, (2, 16, 2)).astype(np.float32)
    rew = rng.uniform(0, 1, (16, 2)).astype(np.float32)
    mask = np.ones((16, 2), bool)
    tau = 0.25
    chosen = np.where(rew[:, 0] > rew[:, 1], 0, 1)
    rows = np.arange(16)
    h = (pol[rows, chosen] - ref[rows, chosen]) - (pol[rows, 1 - chosen] - ref[rows, 1 - chosen])
    loss, _ = ipo_loss(pol, ref, rew, mask, beta=tau)
    np.testing.assert_allclose(float(loss), np.mean((h - 1 / (2 * tau)) ** 2), rtol=1e-5)
    # Its minimum is at h = 1/(2 tau), not at h -> infinity as for DPO.
    target = np.stack([np.full(16, 0.5 / tau), np.zeros(16)], axis=1).astype(np.float32)
    target = np.where(chosen[:, None] == 0, target, target[:, ::-1])
    loss_at_target, _ = ipo_loss(target, np.zeros_like(target), rew, mask, beta=tau)
    assert float(loss_at_target) < 1e-10
    grad = jax.grad(lambda p: ipo_loss(p, np.zeros_like(target), rew, mask, beta=tau)[0])(
        jnp.asarray(target))
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradient_sign_and_finiteness(name):
    """The gradient pushes the best candidate's log-prob up and the worst one's down."""
    rng = np.random.default_rng(5)
    pol, ref, rew, mask = random_batch(rng, b=4, k=6, tie_levels=50)
    rew = rng.permuted(np.tile(np.linspace(0.1, 0.9, 6, dtype=np.float32), (4, 1)), axis=1)
    mask[:] = True
    mask[2, :2] = False
    lengths = lengths_like(mask, rng)
    if name == "ipo":  # below its target gap 1/(2 tau) IPO pushes like DPO; policy = reference
        ref = pol.copy()
    if name in REFERENCE_FREE_LOSSES:
        pol = reference_free_logps(pol, mask)
    pol = np.where(mask, pol, np.nan).astype(np.float32)
    grad = jax.grad(lambda p: call_loss(name, p, ref, rew, mask, lengths)[0])(jnp.asarray(pol))
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[~mask] == 0.0)
    for b in range(4):
        masked_rew = np.where(mask[b], rew[b], np.nan)
        assert grad[b, np.nanargmax(masked_rew)] < 0, (b, grad[b])
        assert grad[b, np.nanargmin(masked_rew)] > 0, (b, grad[b])
    if name in REFERENCE_FREE_LOSSES:
        return
    # The reference model gets the opposite push and is treated like the policy.
    grad_ref = jax.grad(lambda r: LOSSES[name](pol, r, rew, mask)[0])(jnp.asarray(ref))
    np.testing.assert_allclose(np.asarray(grad_ref), -grad, rtol=1e-6, atol=1e-9)


def test_reference_free_losses_use_token_mean_log_probs():
    """Doubling a candidate's tokens at the same per-token log-prob leaves SimPO / ORPO
    unchanged (length-normalised); doubling its summed log-prob at the same length does not."""
    pol = np.array([[-2.0, -6.0, -3.0]], np.float32)
    lengths = np.array([[2, 3, 3]], np.int32)
    rew = np.array([[0.9, 0.1, 0.5]], np.float32)
    mask = np.ones((1, 3), bool)
    for fn in (simpo_loss, orpo_loss):
        base = float(fn(pol, rew, mask, lengths=lengths)[0])
        longer = float(fn(pol * [[2, 1, 1]], rew, mask, lengths=lengths * [[2, 1, 1]])[0])
        np.testing.assert_allclose(longer, base, rtol=1e-6)
        assert abs(float(fn(pol * [[2, 1, 1]], rew, mask, lengths=lengths)[0]) - base) > 1e-3


def test_orpo_log_odds_are_stable_near_probability_one_and_zero():
    """log odds at token-mean log-probs from -1e-5 to -80 vs float64 -log(expm1(-m)); at and
    above the clamp (m = 0, a candidate of certain tokens) loss and gradient stay finite."""
    m = -np.logspace(-5, np.log10(80.0), 40)
    lengths = np.ones((40, 2), np.int32)
    pol = np.stack([m, np.full(40, -1.0)], axis=1).astype(np.float32)
    rew = np.tile(np.array([[1.0, 0.0]], np.float32), (40, 1))
    mask = np.ones((40, 2), bool)
    _, metrics = jax.vmap(lambda p, r, k, n: orpo_loss(p[None], r[None], k[None], lengths=n[None]))(
        pol, rew, mask, lengths)
    want = [-math.log(math.expm1(-float(x))) for x in pol[:, 0]]
    np.testing.assert_allclose(np.asarray(metrics["chosen_reward"]), want, rtol=2e-5, atol=1e-5)
    pol = np.array([[0.0, -1.0], [-1e-9, -2.0], [-3.0, 0.0]], np.float32)
    lengths = np.array([[4, 4], [1, 2], [3, 0]], np.int32)  # a real candidate with no tokens too
    rew = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    mask = np.ones((3, 2), bool)
    (loss, metrics), grad = jax.value_and_grad(
        lambda p: orpo_loss(p, rew, mask, lengths=lengths), has_aux=True)(jnp.asarray(pol))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    clamped = -math.log(math.expm1(-ORPO_MAX_MEAN_LOGP))
    # rows 0 and 1 are clamped; row 2's best has m = -3 / 3 tokens = -1
    np.testing.assert_allclose(float(metrics["chosen_reward"]),
                               (2 * clamped - math.log(math.expm1(1.0))) / 3, rtol=1e-4)


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


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_jit_and_vmap_of_public_function(name):
    rng = np.random.default_rng(6)
    batches = []
    for _ in range(4):
        pol, ref, rew, mask = random_batch(rng, b=3, k=5)
        batches.append((pol, ref, rew, mask, lengths_like(mask, rng)))
    stacked = [np.stack(x) for x in zip(*batches)]  # [G, B, K]

    def fn(pol, ref, rew, mask, lengths):
        return call_loss(name, pol, ref, rew, mask, lengths)

    eager = [fn(*batch) for batch in batches]
    jitted = jax.jit(fn)(*batches[0])
    np.testing.assert_allclose(float(jitted[0]), float(eager[0][0]), rtol=1e-6)
    vm_loss, vm_metrics = jax.jit(jax.vmap(fn))(*stacked)
    np.testing.assert_allclose(np.asarray(vm_loss), [float(e[0]) for e in eager], rtol=1e-6)
    assert vm_metrics["num_valid_lists"].shape == (4,)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_batch_loss_is_the_mean_of_per_list_losses(name):
    """The vmapped [B, K] loss equals a Python loop over the lists, one [1, K] call each."""
    rng = np.random.default_rng(14)
    pol, ref, rew, mask = random_batch(rng, b=8, k=5, tie_levels=3)
    lengths = lengths_like(mask, rng)
    if name in REFERENCE_FREE_LOSSES:
        pol = reference_free_logps(pol, mask)
    loss, metrics = call_loss(name, pol, ref, rew, mask, lengths)
    per_list = [call_loss(name, pol[b:b + 1], ref[b:b + 1], rew[b:b + 1], mask[b:b + 1],
                          lengths[b:b + 1]) for b in range(8)]
    valid = [(float(l), m) for l, m in per_list if float(m["num_valid_lists"]) == 1.0]
    assert 0 < len(valid) < 8  # the batch mixes valid and invalid lists
    np.testing.assert_allclose(float(loss), np.mean([l for l, _ in valid]), rtol=1e-5)
    assert float(metrics["num_valid_lists"]) == len(valid)
    for key in ("chosen_reward", "rejected_reward", "margin"):
        np.testing.assert_allclose(float(metrics[key]), np.mean([float(m[key]) for _, m in valid]),
                                   rtol=1e-5, atol=1e-6, err_msg=key)


DEGENERATE = {
    "all_tied": (np.full((1, 4), 0.5, np.float32), np.ones((1, 4), bool)),
    "all_masked": (np.array([[0.9, 0.1, 0.5, 0.3]], np.float32), np.zeros((1, 4), bool)),
    "single_candidate": (np.array([[0.9, 0.1, 0.5, 0.3]], np.float32),
                         np.array([[False, True, False, False]])),
    "tied_real_untied_padding": (np.array([[0.2, 0.2, 0.9, 0.0]], np.float32),
                                 np.array([[True, True, False, False]])),
}


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_invalid_batch_gives_zero_loss_and_zero_gradient(name, case):
    rew, mask = DEGENERATE[case]
    # Padding holds -inf / NaN log-probs and no tokens, as a careless caller might leave them.
    pol = np.where(mask, -20.0, -np.inf).astype(np.float32)
    ref = np.where(mask, -21.0, np.nan).astype(np.float32)
    lengths = np.where(mask, 7, 0).astype(np.int32)
    fn = jax.jit(lambda p: call_loss(name, p, ref, rew, mask, lengths))
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(pol))
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["num_valid_lists"]) == 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_invalid_lists_are_left_out_of_the_mean(name):
    rng = np.random.default_rng(8)
    pol, ref, _, _ = random_batch(rng, b=3, k=4)
    rew = np.array([[0.9, 0.1, 0.5, 0.3], [0.5] * 4, [0.9, 0.1, 0.5, 0.3]], np.float32)
    mask = np.array([[True] * 4, [True] * 4, [True, False, False, False]])
    lengths = np.where(mask, 3, 0).astype(np.int32)
    pol[2, 1:] = np.nan  # padding of the single-candidate list must not leak anywhere
    loss, metrics = call_loss(name, pol, ref, rew, mask, lengths)
    loss_one, _ = call_loss(name, pol[:1], ref[:1], rew[:1], mask[:1], lengths[:1])
    np.testing.assert_allclose(float(loss), float(loss_one), rtol=1e-6)
    assert float(metrics["num_valid_lists"]) == 1.0
    grad = jax.grad(lambda p: call_loss(name, p, ref, rew, mask, lengths)[0])(jnp.asarray(pol))
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


@pytest.mark.parametrize("name", ["perpo", "ipo", "simpo", "orpo"])
def test_low_precision_inputs_use_float32_math(name):
    rng = np.random.default_rng(9)
    pol, ref, rew, mask = random_batch(rng)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (pol, ref, rew)]
    loss_bf16, metrics = call_loss(name, *bf16, mask, lengths_like(mask, rng))
    assert loss_bf16.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_shape_mismatch_names_the_tensor():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="rewards"):
        perpo_loss(x, x, np.zeros((2, 4), np.float32), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="policy_logps"):
        dpo_loss(np.zeros(3), np.zeros(3), np.zeros(3), np.ones(3, bool))
    with pytest.raises(ValueError, match="lengths"):
        simpo_loss(x, x, np.ones((2, 3), bool), lengths=np.ones((2, 4)))
    with pytest.raises(ValueError, match="policy_logps"):
        orpo_loss(np.zeros(3), np.zeros(3), np.ones(3, bool), lengths=np.ones(3))
