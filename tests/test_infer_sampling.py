"""Sampling as pure functions: greedy, temperature, top-k, top-p, keys; no model involved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.infer import filter_logits, greedy, sample


def _logits(seed=0, B=4, V=50):
    return jax.random.normal(jax.random.key(seed), (B, V)) * 2.0


def _top_k_set(row, k):
    return set(np.argsort(-row)[:k].tolist())


def _nucleus_set(row, p):
    """Smallest set of most likely tokens whose probability reaches p, written plainly."""
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    kept, mass = set(), 0.0
    for t in np.argsort(-probs):
        kept.add(int(t))
        mass += probs[t]
        if mass >= p:
            break
    return kept


def _kept(filtered):
    return [set(np.flatnonzero(np.isfinite(r)).tolist()) for r in np.asarray(filtered)]


def test_greedy_is_argmax():
    logits = _logits()
    assert np.array_equal(np.asarray(greedy(logits)), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("k", [1, 3, 17])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = _logits(1)
    for row, kept in zip(np.asarray(logits), _kept(filter_logits(logits, top_k=k))):
        assert kept == _top_k_set(row, k)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_top_p_keeps_the_nucleus(p):
    logits = _logits(2)
    for row, kept in zip(np.asarray(logits), _kept(filter_logits(logits, top_p=p))):
        assert kept == _nucleus_set(row, p)


def test_top_k_then_top_p_renormalises_after_the_cut():
    logits = _logits(3)
    k, p = 5, 0.6
    for row, kept in zip(np.asarray(logits), _kept(filter_logits(logits, top_k=k, top_p=p))):
        top = sorted(_top_k_set(row, k))
        sub = np.full_like(row, -np.inf)
        sub[top] = row[top]
        assert kept == _nucleus_set(sub, p)


def test_no_cut_keeps_everything():
    logits = _logits(4)
    assert np.array_equal(np.asarray(filter_logits(logits, 0, 1.0)), np.asarray(logits))


@pytest.mark.parametrize("k,p", [(4, 1.0), (0, 0.7), (6, 0.8)])
def test_samples_never_leave_the_allowed_set(k, p):
    row = np.asarray(_logits(5, B=1, V=40))[0]
    allowed = _top_k_set(row, k) if k else set(range(40))
    if p < 1:
        sub = np.full_like(row, -np.inf)
        sub[sorted(allowed)] = row[sorted(allowed)]
        allowed = _nucleus_set(sub, p)
    logits = jnp.tile(row, (4000, 1))  # rows are sampled independently
    drawn = set(np.asarray(sample(jax.random.key(7), logits, 1.0, k, p)).tolist())
    assert drawn <= allowed
    assert len(drawn) > 1 and len(drawn) >= len(allowed) - 1  # the cut is not greedy in disguise


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = _logits(6, B=64)
    want = np.asarray(greedy(logits))
    for key in range(3):
        assert np.array_equal(np.asarray(sample(jax.random.key(key), logits, 1.0, 1, 1.0)), want)
        assert np.array_equal(np.asarray(sample(jax.random.key(key), logits, 1.0, 0, 1e-6)), want)


def test_same_key_same_samples_other_key_other_samples():
    logits = _logits(8, B=256)
    a = sample(jax.random.key(1), logits, 1.0)
    b = sample(jax.random.key(1), logits, 1.0)
    c = sample(jax.random.key(2), logits, 1.0)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_temperature_sharpens_and_flattens():
    row = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    logits = jnp.tile(row, (20000, 1))
    freq = lambda t: np.bincount(np.asarray(sample(jax.random.key(0), logits, t)),  # noqa: E731
                                 minlength=4) / 20000
    for t in (0.5, 1.0, 2.0):
        want = np.exp(row / t) / np.exp(row / t).sum()
        np.testing.assert_allclose(freq(t), want, atol=0.015)


def test_settings_are_traced_not_recompiled():
    f = jax.jit(sample)
    logits = _logits(9)
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 2, 0.5)]:
        f(jax.random.key(0), logits, jnp.float32(t), jnp.int32(k), jnp.float32(p))
    assert f._cache_size() == 1
