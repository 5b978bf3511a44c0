"""Decoder-only and encoder-decoder transformers: causality, padding, packing, options."""

import re

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


def _rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def test_lm_bfloat16_compute_is_close(lm):
    """bf16 compute stays far closer to fp32 than any position error would move the logits.

    Weights are scaled up (x8) so attention is sharp and positions matter; positions start
    at 300, where bf16 can no longer hold every integer. The error bound is relative to the
    observed effect of a one-step position shift in the second half of the sequence (and,
    for Llama, of removing RoPE): a bf16 path that dropped RoPE, rounded positions to bf16
    or shifted them fails it."""
    c, model, params = lm
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, params)
    toks = _tokens((2, 16), c.vocab_size, 5)
    start = 300 if c.use_rope else 8  # learned positions stop at max_len
    pos = jnp.broadcast_to(jnp.arange(16) + start, (2, 16))
    want = model.apply({"params": params}, toks, positions_BT=pos)
    got = build(c.replace(dtype="bfloat16")).apply({"params": params}, toks, positions_BT=pos)
    assert got.dtype == jnp.float32  # logits come back in fp32 for the loss
    gap = pos + (jnp.arange(16) >= 8)
    signals = [_rms(model.apply({"params": params}, toks, positions_BT=gap) - want)]
    if c.use_rope:  # a rotary base so large that nothing rotates: RoPE removed
        no_rope = build(c.replace(rope_theta=1e30))
        signals.append(_rms(no_rope.apply({"params": params}, toks, positions_BT=pos) - want))
    error = _rms(got - want)
    assert error < 0.2 * min(signals), (error, signals)


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


def _normalised_last(x_BTE):
    """Each position's vector has mean 0 and variance 1 (a LayerNorm with gain 1, bias 0)."""
    x = np.asarray(x_BTE, np.float64)
    np.testing.assert_allclose(x.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.var(-1), 1.0, rtol=1e-3)


def _block_outputs(model, params, src, tgt):
    """Every encoder and decoder block's output, captured from a forward pass."""
    _, state = model.apply({"params": params}, src, tgt, capture_intermediates=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    return [inter[k]["__call__"][0][0] for k in sorted(inter)
            if re.fullmatch(r"(en|de)coder_\d+", k)]


def test_encdec_post_ln_is_the_paper_layout():
    """Post-LN (the paper): LayerNorm is the last operation of every sub-layer, so every
    block's output is normalised; pre-LN blocks leave the residual stream unnormalised and
    only the final norms normalise it. Weights are scaled so nothing is normal by chance."""
    src, tgt = _tokens((2, 9), 256, 10), _tokens((2, 7), 256, 11)
    for name, post in (("post-ln", True), ("pre-ln-unshared", False)):
        c = ENCDEC[name]
        model = build(c)
        # gains 1 and biases 0 in every norm (the init), everything else scaled up
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * 3.0 + 0.1,
            init(c, 0))
        outs = _block_outputs(model, params, src, tgt)
        assert len(outs) == c.n_encoder_layers + c.n_decoder_layers
        for x in outs:
            if post:
                _normalised_last(x)
            else:
                assert abs(float(np.asarray(x).var(-1).mean()) - 1.0) > 0.5
        memory = model.apply({"params": params}, src, method=model.encode)
        _normalised_last(memory)  # post-LN: the last block's norm; pre-LN: final
    assert "encoder_norm" not in init(ENCDEC["post-ln"], 0)  # post-LN has no final norm
    p2 = init(ENCDEC["pre-ln-unshared"], 0)
    assert {"encoder_norm", "decoder_norm", "src_embed", "tgt_embed", "lm_head"} <= set(p2)
