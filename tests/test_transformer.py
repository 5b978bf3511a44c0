"""Decoder-only and encoder-decoder transformers: causality, padding, packing, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models import build, get_config, init

SMALL = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
LMS = {
    "gpt2": get_config("gpt-tiny", **SMALL),
    "llama": get_config("llama-tiny", **SMALL, n_kv_heads=2),
    "llama-mqa-tied": get_config("llama-tiny", **SMALL, n_kv_heads=1, tie_embeddings=True),
}
ENCDEC = {
    "post-ln": get_config("transformer-seq2seq", d_model=32, n_heads=4, d_ff=64, max_len=32),
    "pre-ln-unshared": get_config("transformer-seq2seq", d_model=32, n_heads=4, d_ff=64,
                                  max_len=32, pre_ln=True, share_embeddings=False),
}


def _tokens(shape, vocab, seed):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256)


@pytest.fixture(scope="module", params=list(LMS))
def lm(request):
    c = LMS[request.param]
    return c, build(c), init(c, 0)


@pytest.fixture(scope="module", params=list(ENCDEC))
def encdec(request):
    c = ENCDEC[request.param]
    return c, build(c), init(c, 0)


def test_lm_shapes_and_dtype(lm):
    c, model, params = lm
    logits = model.apply({"params": params}, _tokens((2, 9), c.vocab_size, 0))
    assert logits.shape == (2, 9, c.vocab_size) and logits.dtype == jnp.float32


def test_lm_causality(lm):
    c, model, params = lm
    toks = _tokens((2, 12), c.vocab_size, 1)
    base = model.apply({"params": params}, toks)
    for t in (0, 5, 10):
        changed = toks.at[:, t + 1:].set((toks[:, t + 1:] + 7) % 256)
        out = model.apply({"params": params}, changed)
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5)
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)


def test_lm_right_and_left_padding_change_nothing_real(lm):
    c, model, params = lm
    toks = _tokens((1, 7), c.vocab_size, 2)
    want = model.apply({"params": params}, toks)
    pad = jnp.full((1, 5), c.pad_id, jnp.int32)
    right = jnp.concatenate([toks, pad], 1)
    valid_r = jnp.arange(12)[None] < 7
    out_r = model.apply({"params": params}, right, padding_mask_BT=valid_r)
    np.testing.assert_allclose(out_r[:, :7], want, atol=1e-5)
    left = jnp.concatenate([pad, toks], 1)
    valid_l = jnp.arange(12)[None] >= 5
    pos = jnp.maximum(jnp.arange(12)[None] - 5, 0)
    out_l = model.apply({"params": params}, left, positions_BT=pos, padding_mask_BT=valid_l)
    np.testing.assert_allclose(out_l[:, 5:], want, atol=1e-5)


def test_lm_packed_documents_do_not_see_each_other(lm):
    c, model, params = lm
    a, b = _tokens((1, 5), c.vocab_size, 3), _tokens((1, 6), c.vocab_size, 4)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 5 + [2] * 6])
    pos = jnp.array([list(range(5)) + list(range(6))])
    out = model.apply({"params": params}, packed, positions_BT=pos, segment_ids_BT=seg)
    np.testing.assert_allclose(out[:, :5], model.apply({"params": params}, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], model.apply({"params": params}, b), atol=1e-5)


def test_lm_bfloat16_compute_is_close(lm):
    c, model, params = lm
    toks = _tokens((2, 8), c.vocab_size, 5)
    want = model.apply({"params": params}, toks)
    bf = build(c.replace(dtype="bfloat16"))
    got = bf.apply({"params": params}, toks)
    assert got.dtype == jnp.float32  # logits come back in fp32 for the loss
    np.testing.assert_allclose(got, want, atol=0.1, rtol=0.1)


def test_encdec_shapes_and_decoder_causality(encdec):
    c, model, params = encdec
    src, tgt = _tokens((2, 9), 256, 6), _tokens((2, 7), 256, 7)
    base = model.apply({"params": params}, src, tgt)
    assert base.shape == (2, 7, c.tgt_vocab_size)
    changed = tgt.at[:, 4:].set((tgt[:, 4:] + 3) % 256)
    out = model.apply({"params": params}, src, changed)
    np.testing.assert_allclose(out[:, :4], base[:, :4], atol=1e-5)
    # every target position sees the whole source
    src2 = src.at[:, -1].set((src[:, -1] + 1) % 256)
    assert not np.allclose(model.apply({"params": params}, src2, tgt)[:, 0], base[:, 0], atol=1e-4)


def test_encdec_source_padding_changes_nothing(encdec):
    c, model, params = encdec
    src, tgt = _tokens((1, 6), 256, 8), _tokens((1, 5), 256, 9)
    want_mem = model.apply({"params": params}, src, method=model.encode)
    want = model.apply({"params": params}, src, tgt)
    padded = jnp.concatenate([src, jnp.full((1, 4), c.pad_id, jnp.int32)], 1)
    mask = jnp.arange(10)[None] < 6
    mem = model.apply({"params": params}, padded, mask, method=model.encode)
    np.testing.assert_allclose(mem[:, :6], want_mem, atol=1e-5)
    np.testing.assert_allclose(model.apply({"params": params}, padded, tgt, mask), want, atol=1e-5)


def test_encdec_post_ln_is_the_paper_layout():
    p = init(ENCDEC["post-ln"], 0)
    assert "encoder_norm" not in p and "decoder_norm" not in p  # post-LN: no final norm
    p2 = init(ENCDEC["pre-ln-unshared"], 0)
    assert {"encoder_norm", "decoder_norm", "src_embed", "tgt_embed", "lm_head"} <= set(p2)
