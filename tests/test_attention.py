"""The reference attention against jax / flax, the module against a hand-written per-head loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models import attention as A

B, T, S, H, D = 2, 5, 7, 4, 8


def _qkv(kv_heads, t=T, s=S, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, t, H, D))
    k = jax.random.normal(kk, (B, s, kv_heads, D))
    v = jax.random.normal(kv, (B, s, kv_heads, D))
    return q, k, v


def _masks(t, s):
    lengths = jnp.array([s, s - 3])
    pad = A.padding_mask(A.lengths_to_mask(lengths, s))
    return {"none": None, "causal": A.causal_mask(t, s), "padding": pad,
            "causal+padding": A.combine_masks(A.causal_mask(t, s), pad)}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "causal+padding"])
def test_reference_equals_jax_and_flax(kv_heads, mask_name):
    q, k, v = _qkv(kv_heads, t=S, s=S)  # square so the causal mask is the usual one
    mask = _masks(S, S)[mask_name]
    ref = A.scaled_dot_product_attention(q, k, v, mask)
    full_mask = None if mask is None else jnp.broadcast_to(mask, (B, H, S, S))
    fast = jax.nn.dot_product_attention(q, k, v, mask=full_mask, implementation="xla")
    np.testing.assert_allclose(ref, fast, atol=1e-5, rtol=1e-5)
    # flax's version has no grouped-query heads: give it the kv heads repeated
    rep = H // kv_heads
    flax_out = nn.dot_product_attention(q, jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2),
                                        mask=full_mask, precision="highest")
    np.testing.assert_allclose(ref, flax_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
def test_fast_path_dispatch_matches_reference(impl):
    q, k, v = _qkv(2, t=S, s=S, seed=1)
    mask = _masks(S, S)["padding"]
    want = A.scaled_dot_product_attention(q, k, v, A.combine_masks(mask, A.causal_mask(S)))
    got = A.dot_product_attention(q, k, v, mask, impl=impl, is_causal=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_reference_reads_like_the_formula():
    """One head, no mask: softmax(q k^T / sqrt(d)) v written with numpy."""
    q, k, v = (np.asarray(x[:1, :, :1, :]) for x in _qkv(4))
    scores = q[0, :, 0] @ k[0, :, 0].T / np.sqrt(D)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v[0, :, 0]
    got = A.scaled_dot_product_attention(q, k, v)[0, :, 0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bad_gqa_heads_raise():
    q, k, v = _qkv(3)
    with pytest.raises(ValueError, match="must divide"):
        A.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        A.dot_product_attention(*_qkv(2), impl="flash")


@pytest.mark.parametrize("kv_heads,use_bias", [(4, True), (2, False), (1, True)])
def test_multihead_equals_per_head_by_hand(kv_heads, use_bias):
    E = 16
    mha = A.MultiHeadAttention(n_heads=H, n_kv_heads=kv_heads, head_dim=D, out_features=E,
                               use_bias=use_bias, impl="xla")
    x = jax.random.normal(jax.random.key(3), (B, T, E))
    mem = jax.random.normal(jax.random.key(4), (B, S, E))
    p = nn.meta.unbox(mha.init(jax.random.key(5), x, mem)["params"])
    if use_bias:  # non-zero biases so that they are really checked
        p = jax.tree.map(lambda a: a + 0.1 if a.ndim <= 2 else a, p)
    mask = A.padding_mask(A.lengths_to_mask(jnp.array([S, 4]), S))
    got = mha.apply({"params": p}, x, mem, mask=mask)

    def proj(name, inp, h):
        out = inp @ p[name]["kernel"][:, h, :]
        return out + p[name]["bias"][h] if use_bias else out

    group = H // kv_heads
    heads = []
    for h in range(H):
        q = proj("query", x, h)
        k, v = proj("key", mem, h // group), proj("value", mem, h // group)
        scores = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D)
        scores = jnp.where(mask[:, 0], scores, -1e30)
        heads.append(jax.nn.softmax(scores, -1) @ v)
    concat = jnp.concatenate(heads, axis=-1)  # [B, T, H*D]
    want = concat @ p["out"]["kernel"].reshape(H * D, E)
    if use_bias:
        want = want + p["out"]["bias"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    inv = A.rope_inv_freq(D, 10000.0)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, D))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, D))

    def score(m, n):
        qm = A.apply_rope(q, jnp.array([[m]]), inv)
        kn = A.apply_rope(k, jnp.array([[n]]), inv)
        return float(jnp.sum(qm * kn))

    assert score(3, 1) == pytest.approx(score(12, 10), rel=1e-4, abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_llama3_rope_scaling_keeps_high_and_scales_low_frequencies():
    base = A.rope_inv_freq(64, 500000.0)
    scaled = A.rope_inv_freq(64, 500000.0, (32.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(scaled[0], base[0])  # shortest wavelength untouched
    np.testing.assert_allclose(scaled[-1], base[-1] / 32.0, rtol=1e-6)  # longest divided


def test_masks():
    np.testing.assert_array_equal(A.causal_mask(3)[0, 0], np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(A.lengths_to_mask(jnp.array([1, 3]), 3),
                                  [[True, False, False], [True, True, True]])
    seg = jnp.array([[1, 1, 2]])
    np.testing.assert_array_equal(A.segment_mask(seg, seg)[0, 0],
                                  [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
