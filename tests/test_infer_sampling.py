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


def _counting(fn):
    """fn under jit, with a list that grows each time jit traces it (a cache miss)."""
    traces = []

    def traced(*args):
        traces.append(1)
        return fn(*args)
    return traces, traced


def test_settings_are_traced_not_recompiled():
    traces, fn = _counting(sample)
    f = jax.jit(fn)
    logits = _logits(9)
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 2, 0.5)]:
        f(jax.random.key(0), logits, jnp.float32(t), jnp.int32(k), jnp.float32(p))
    assert len(traces) == 1


# ---------------------------------------------------------------- parity with transformers


def _hf_filter(logits, temperature, top_k, top_p):
    """transformers' warpers, in generate()'s order, on a float32 copy."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = torch.tensor(np.asarray(logits, np.float32))
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    for w in warpers:
        scores = w(None, scores)
    return scores.numpy()


_filter_jit = jax.jit(filter_logits)  # one compile per vocabulary size, settings traced


def _ours(logits, temperature, top_k, top_p):
    return np.asarray(_filter_jit(jnp.asarray(logits, jnp.float32) / temperature,
                                  jnp.int32(top_k), jnp.float32(top_p)))


def _cases(V):
    rng = np.random.default_rng(V)
    rand = rng.normal(0, 3, (3, V)).astype(np.float32)
    # a few distinct values: many ties, also at the top-k boundary
    tied = rng.integers(0, 6, (3, V)).astype(np.float32)
    bf16 = np.asarray(jnp.asarray(rand, jnp.bfloat16).astype(jnp.float32))  # rounded: ties
    return {"random": rand, "tied": tied, "bf16": bf16}


def _exact_keep(logits, temperature, top_k, top_p):
    """The same rule in float64 numpy (ties at either cut-off kept): the ground truth."""
    x = logits.astype(np.float64) / np.float64(np.float32(temperature))
    if top_k:
        kth = np.sort(x, -1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p >= 1:
        return np.isfinite(x)
    asc = np.sort(x, -1)
    probs = np.exp(asc - asc[:, -1:])
    mass = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    removed = mass <= 1 - np.float64(np.float32(top_p))
    removed[:, -1] = False
    cut = np.take_along_axis(asc, removed.sum(-1, keepdims=True), -1)
    return np.isfinite(x) & (x >= cut)


FILTERS = [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (1.3, 40, 0.8), (1.0, 0, 0.999),
           (0.5, 3, 0.5)]


@pytest.mark.parametrize("V", [1000, 128256])
@pytest.mark.parametrize("name", ["random", "tied", "bf16"])
def test_filters_match_transformers_warpers(V, name):
    """Equal to transformers' Temperature/TopK/TopP warpers, except where our computation is
    the exact one and our documented tie rule. We never drop a token transformers keeps; on
    logits without ties at the nucleus cut-off we keep transformers' set, plus at most one
    boundary token at V = 128256 where its float32 sum rounds (ours equals float64); where
    tokens tie at the cut-off value we keep all of them."""
    logits = _cases(V)[name]
    for t, k, p in FILTERS:
        want, got = _hf_filter(logits, t, k, p), _ours(logits, t, k, p)
        keep_hf, keep = np.isfinite(want), np.isfinite(got)
        assert np.array_equal(keep, _exact_keep(logits, t, k, p)), (t, k, p)
        np.testing.assert_allclose(got[keep_hf], want[keep_hf], rtol=1e-6)
        assert not (keep_hf & ~keep).any(), (t, k, p)
        extra = keep & ~keep_hf
        rounding = 0 if V == 1000 else 1
        if name == "random":  # no ties at any cut-off
            assert (extra.sum(-1) <= rounding).all(), (t, k, p)
        else:  # the extra tokens tie with the lowest value transformers kept
            for b in range(len(logits)):
                tied = got[b] == want[b][keep_hf[b]].min()
                assert (extra[b] & ~tied).sum() <= rounding, (t, k, p)


def test_top_p_one_and_top_k_zero_keep_every_token_of_a_large_vocabulary():
    logits = np.random.default_rng(0).normal(0, 8, (2, 128256)).astype(np.float32)
    assert np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), 0, 1.0))).all()
    # just below 1 the nucleus is exact (ascending sums), not cut short by rounding
    for p in (0.9999999, 0.9999):
        assert np.array_equal(np.isfinite(_ours(logits, 1.0, 0, p)),
                              _exact_keep(logits, 1.0, 0, p))


def test_nucleus_is_taken_on_what_top_k_kept_and_ties_at_the_cut_stay():
    """[2, 1, 1, 1], top_k=2, top_p=0.6: top-k keeps all four (ties at its boundary), the
    nucleus then needs the 2 and one 1; transformers keeps one of the tied 1s (its sort's
    pick), we keep all tokens tied at the cut-off value."""
    logits = np.array([[2.0, 1.0, 1.0, 1.0]], np.float32)
    want = np.isfinite(_hf_filter(logits, 1.0, 2, 0.6))[0]
    got = np.isfinite(_ours(logits, 1.0, 2, 0.6))[0]
    assert want.sum() == 2 and want[0]
    assert got.tolist() == [True, True, True, True]
    # with the tie broken, both agree on two tokens
    logits = np.array([[2.0, 1.01, 1.0, 1.0]], np.float32)
    assert (np.isfinite(_ours(logits, 1.0, 2, 0.6)) ==
            np.isfinite(_hf_filter(logits, 1.0, 2, 0.6))).all()


def test_sampling_settings_are_one_traced_pytree():
    from fmzoo.infer.sampling import next_token, sampling_settings
    traces, fn = _counting(next_token)
    f = jax.jit(fn, static_argnums=3)
    logits = _logits(10)
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 0.9)]:
        f(jax.random.key(0), logits, sampling_settings(t, k, p, 1.2, 3), True)
    assert len(traces) == 1
    assert np.array_equal(np.asarray(f(jax.random.key(0), logits, sampling_settings(), False)),
                          np.asarray(greedy(logits)))
