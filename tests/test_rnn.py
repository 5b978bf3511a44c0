"""RNN seq2seq: shapes, padding, causality, step-wise decoding, the final-state bottleneck,
vanishing gradients and logical axis names.

Every model test reuses a few configs and the shapes SRC/TGT, so each jitted function
compiles once per config (the suite must stay fast on two busy cores).
Shape letters: B batch, S source length, T target length, H hidden width, V vocabulary.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models import get_config, registry
from fmzoo.models.cache import RNNState
from fmzoo.models.rnn import RNNSeq2Seq, open_keep_gates, state_gradient_norms
from fmzoo.models.registry import place_params

SMALL = dict(d_embed=8, d_hidden=16, src_vocab_size=40, tgt_vocab_size=48, pad_id=0, bos_id=1,
             eos_id=2)
PAD = 0
SRC, TGT = (2, 6), (2, 5)
VARIANTS = [("gru", None), ("lstm", "bahdanau"), ("rnn", "luong")]


def small(cell, attention):
    preset = "rnn-seq2seq" if attention is None else "rnn-seq2seq-attn"
    return get_config(preset, cell=cell, attention=attention, **SMALL)


@functools.lru_cache(maxsize=None)
def init_params(config):
    # eager: the initialisers' kernels (QR for orthogonal) compile once for all configs
    return registry.init(config, 0)


@functools.lru_cache(maxsize=None)
def jitted(config, method):
    """model.apply(..., method=method) for one config, compiled once per input shape."""
    model = RNNSeq2Seq(config)
    return jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, method=method, **kw))


@functools.lru_cache(maxsize=None)
def runner(config):
    """(params, src, tgt, src_mask) -> (encoder final state, teacher-forced logits)."""
    model = RNNSeq2Seq(config)

    def run(params, src_BS, tgt_BT, src_mask_BS):
        v = {"params": params}
        final = model.apply(v, src_BS, src_mask_BS, method=model.encode)[1]
        return final, model.apply(v, src_BS, tgt_BT, src_mask_BS)

    return jax.jit(run)


def tokens(key, shape, vocab):
    return jax.random.randint(jax.random.key(key), shape, 1, vocab, dtype=jnp.int32)


def full(shape):
    return jnp.ones(shape, bool)


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("attention", [None, "bahdanau"])
def test_forward_shapes_and_finite(attention):
    src, tgt = tokens(1, SRC, 40), tokens(2, TGT, 48)
    for cell in ("rnn", "gru", "lstm"):
        config = small(cell, attention)
        final, logits = runner(config)(init_params(config), src, tgt, full(SRC))
        assert logits.shape == (*TGT, 48) and logits.dtype == jnp.float32
        assert all(x.shape == (2, 16) for x in jax.tree.leaves(final))
        assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("cell,attention", [("gru", "bahdanau"), ("lstm", "luong")])
def test_bf16_compute_gives_fp32_logits(cell, attention):
    config = small(cell, attention).replace(dtype="bfloat16")
    src, tgt = tokens(3, SRC, 40), tokens(4, TGT, 48)
    _, logits = runner(config)(init_params(config), src, tgt, full(SRC))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    reference = small(cell, attention)
    _, logits32 = runner(reference)(init_params(reference), src, tgt, full(SRC))
    assert max_diff(logits, logits32) < 0.1 * float(np.abs(np.asarray(logits32)).max())


@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_padding_changes_nothing(cell, attention):
    """Rows of 4 and 2 tokens, alone in [2, 4] and padded with junk ids to [2, 6]."""
    config = small(cell, attention)
    params, run = init_params(config), runner(config)
    tgt = tokens(6, TGT, 48)
    mask = jnp.array([[True] * 4, [True] * 2 + [False] * 2])
    src = jnp.where(mask, tokens(5, (2, 4), 40), PAD)
    wide_mask = jnp.pad(mask, ((0, 0), (0, 2)))
    wide = jnp.where(wide_mask, jnp.pad(src, ((0, 0), (0, 2))), tokens(7, SRC, 40))
    final, logits = run(params, src, tgt, mask)
    final_w, logits_w = run(params, wide, tgt, wide_mask)
    assert_trees_close(final, final_w, atol=1e-6)
    np.testing.assert_allclose(logits, logits_w, atol=1e-5)
    # the junk does reach the model when it is not masked out
    assert max_diff(run(params, wide, tgt, full(SRC))[1], logits_w) > 1e-4


def test_empty_source_keeps_the_initial_state():
    config = small("lstm", "bahdanau")
    final, logits = runner(config)(init_params(config), tokens(8, SRC, 40), tokens(8, TGT, 48),
                                   jnp.zeros(SRC, bool))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(final))
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("cell,attention", VARIANTS)
def test_decoder_is_causal(cell, attention):
    config = small(cell, attention)
    params, run = init_params(config), runner(config)
    src, tgt = tokens(9, SRC, 40), tokens(10, TGT, 48)
    t = 3
    _, a = run(params, src, tgt, full(SRC))
    _, b = run(params, src, tgt.at[:, t].set((tgt[:, t] + 1) % 48), full(SRC))
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert max_diff(a[:, t:], b[:, t:]) > 1e-4


@pytest.mark.parametrize("cell,attention", VARIANTS + [("lstm", "luong")])
def test_decode_all_at_once_equals_one_token_at_a_time(cell, attention):
    config = small(cell, attention)
    params, dec = init_params(config), jitted(config, "decode")
    src, tgt = tokens(11, SRC, 40), tokens(12, TGT, 48)
    src_mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2])
    prefill = jax.jit(lambda p, s, m: jitted(config, "init_decode_state")(
        p, *jitted(config, "encode")(p, s, m), m))
    state0 = prefill(params, src, src_mask)
    assert all(x.shape[0] == 2 for x in jax.tree.leaves(state0))
    logits, state_all = dec(params, tgt, state0, tgt_mask_BT=full(TGT))
    np.testing.assert_allclose(logits, runner(config)(params, src, tgt, src_mask)[1], atol=1e-6)
    state, steps = state0, []
    for t in range(TGT[1]):
        step_logits, state = dec(params, tgt[:, t:t + 1], state)
        steps.append(step_logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), logits, atol=1e-5)
    assert_trees_close(state, state_all, atol=1e-5)
    # where tgt_mask is False the state stays put: row 1 stops after its first token
    _, held = dec(params, tgt, state0, tgt_mask_BT=jnp.array([[True] * 5, [True] + [False] * 4]))
    _, one = dec(params, tgt[:, :1], state0)
    assert_trees_close(jax.tree.map(lambda x: x[1], held), jax.tree.map(lambda x: x[1], one), 1e-6)


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_vanilla_decoder_sees_only_the_final_state(attention):
    """A tanh encoder with zero recurrent kernel: h_S depends on the last source token only.

    Changing every earlier token leaves the final state (bit for bit) and so the vanilla
    model's logits unchanged, while the attention model, reading all encoder states, moves.
    Both models share the same edited encoder and source embeddings.
    """
    cv, ca = small("rnn", None), small("rnn", attention)
    pv, pa = init_params(cv), init_params(ca)
    encoder = jax.tree.map(jnp.asarray, pv["encoder"])
    encoder["cell"]["h"]["kernel"] = jnp.zeros_like(encoder["cell"]["h"]["kernel"])
    pv = {**pv, "encoder": encoder}
    pa = {**pa, "encoder": encoder, "src_embed": pv["src_embed"]}
    src, tgt = tokens(13, SRC, 40), tokens(14, TGT, 48)
    other = src.at[:, :-1].set((src[:, :-1] + 7) % 39 + 1)  # every token but the last differs
    last = src.at[:, -1].set(src[:, -1] % 39 + 1)
    rv, ra, m = runner(cv), runner(ca), full(SRC)

    f1, v1 = rv(pv, src, tgt, m)
    f2, v2 = rv(pv, other, tgt, m)
    f3, a2 = ra(pa, other, tgt, m)
    _, a1 = ra(pa, src, tgt, m)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(f2, f3)
    np.testing.assert_array_equal(v1, v2)
    assert max_diff(a1, a2) > 1e-3
    # the control: the vanilla decoder does depend on the source, through the last token
    assert max_diff(v1, rv(pv, last, tgt, m)[1]) > 1e-3


# ----------------------------------------------------- attention scores, by hand in numpy


def _np_cell(p, h_BH, x_BI):
    """flax's SimpleCell: h' = tanh(x W_i + b_i + h W_h)."""
    return np.tanh(x_BI @ p["i"]["kernel"] + p["i"]["bias"] + h_BH @ p["h"]["kernel"])


def _np_attend(e_BS, mask_BS, memory_BSH):
    e_BS = np.where(mask_BS, e_BS, -np.inf)
    w_BS = np.exp(e_BS - e_BS.max(axis=-1, keepdims=True))
    w_BS /= w_BS.sum(axis=-1, keepdims=True)
    return np.einsum("bs,bsh->bh", w_BS, memory_BSH)


def luong_dot(P, h_BH, memory_BSH):
    """Luong et al. (2015), 'dot': e_j = h_t . h_j, from the new decoder state."""
    return np.einsum("bh,bsh->bs", h_BH, memory_BSH)


def bahdanau_additive(P, s_BH, memory_BSH):
    """Bahdanau et al. (2015): e_j = v^T tanh(W_q s_{t-1} + W_k h_j)."""
    a = P["decoder"]["attention"]
    q_BA = s_BH @ a["query"]["kernel"]
    k_BSA = memory_BSH @ P["attn_keys"]["kernel"]
    return np.tanh(q_BA[:, None, :] + k_BSA) @ a["v"]


def reference_logits(params, src_BS, mask_BS, tgt_BT, attention, score):
    """Teacher-forced logits of a tanh-cell attention model, every step written out."""
    P = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    mask_BS = np.asarray(mask_BS)
    x_BSE = P["src_embed"]["embedding"][np.asarray(src_BS)]
    h_BH, states = np.zeros((src_BS.shape[0], P["encoder"]["cell"]["h"]["kernel"].shape[0])), []
    for j in range(src_BS.shape[1]):
        h_BH = _np_cell(P["encoder"]["cell"], h_BH, x_BSE[:, j])
        states.append(h_BH)
    memory_BSH = np.stack(states, axis=1)
    last_B = mask_BS.sum(axis=1) - 1
    s_BH = memory_BSH[np.arange(len(last_B)), last_B]  # the state at the last real token
    feed_BH, logits = np.zeros_like(s_BH), []
    for t in range(tgt_BT.shape[1]):
        e_BE = P["tgt_embed"]["embedding"][np.asarray(tgt_BT[:, t])]
        if attention == "luong":
            s_BH = _np_cell(P["decoder"]["cell"], s_BH, np.concatenate([e_BE, feed_BH], -1))
            ctx_BH = _np_attend(score(P, s_BH, memory_BSH), mask_BS, memory_BSH)
            out_BX = feed_BH = np.tanh(np.concatenate([ctx_BH, s_BH], -1)
                                       @ P["decoder"]["combine"]["kernel"])
        else:
            ctx_BH = _np_attend(score(P, s_BH, memory_BSH), mask_BS, memory_BSH)
            s_BH = _np_cell(P["decoder"]["cell"], s_BH, np.concatenate([e_BE, ctx_BH], -1))
            out_BX = np.concatenate([s_BH, ctx_BH], -1)
        logits.append(out_BX @ P["out"]["kernel"] + P["out"]["bias"])
    return np.stack(logits, axis=1)


@pytest.mark.parametrize("attention,score,broken", [
    ("luong", luong_dot, lambda P, h, m: 0 * luong_dot(P, h, m)),
    ("bahdanau", bahdanau_additive,
     lambda P, s, m: bahdanau_additive(P, 0 * s, m)),  # query-independent
])
def test_attention_scores_match_the_papers_formulas(attention, score, broken):
    """The model's logits equal the step-by-step formulas with its own params; a zeroed dot
    score or a query-independent additive score gives clearly different logits."""
    config = small("rnn", attention)
    params = init_params(config)
    if attention == "bahdanau":
        # at init W_q, W_k and v are tiny, the scores nearly equal and the weights nearly
        # uniform, so a query-independent score would hide; scale them to O(1) scores
        att = params["decoder"]["attention"]
        params = {**params, "attn_keys": {"kernel": 30 * params["attn_keys"]["kernel"]},
                  "decoder": {**params["decoder"], "attention": {
                      "query": {"kernel": 30 * att["query"]["kernel"]}, "v": 30 * att["v"]}}}
    src, tgt = tokens(17, SRC, 40), tokens(18, TGT, 48)
    src_mask = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
    got = np.asarray(runner(config)(params, src, tgt, src_mask)[1])
    want = reference_logits(params, src, src_mask, tgt, attention, score)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # the control: the formulas tell a broken score apart, far above the tolerance
    assert max_diff(got, reference_logits(params, src, src_mask, tgt, attention, broken)) > 1e-3


@functools.lru_cache(maxsize=None)
def gradient_profiles(cell, T=50, E=16, H=32, seeds=4, keep_gate_bias=1.0):
    """[seeds, T] ||d h_T / d x_t|| over unit-normal inputs, one fresh cell per seed."""
    keys = jax.random.split(jax.random.key(0), 2 * seeds)
    x_NTE = jax.vmap(lambda k: jax.random.normal(k, (T, E)))(keys[:seeds])
    fn = jax.jit(jax.vmap(lambda x, k: state_gradient_norms(cell, H, x, k, keep_gate_bias)))
    return np.asarray(fn(x_NTE, keys[seeds:]))


def far_over_near(g_NT, k=5):
    return g_NT[:, :k].mean(axis=1) / g_NT[:, -k:].mean(axis=1)


def test_tanh_rnn_gradients_vanish_with_distance():
    g_NT = gradient_profiles("rnn")
    blocks = g_NT.mean(axis=0).reshape(10, 5).mean(axis=1)  # 5-step blocks, far -> near
    assert np.all(np.diff(np.log(blocks)) > 0), blocks
    assert np.all(far_over_near(g_NT) < 1e-4), far_over_near(g_NT)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_cells_keep_gradients_longer_than_tanh(cell):
    """At 50 steps, far/near is >= 100x larger for the gated cell, on every seed's margin."""
    tanh, gated = far_over_near(gradient_profiles("rnn")), far_over_near(gradient_profiles(cell))
    assert gated.min() > 100 * tanh.max(), (gated, tanh)


def test_open_keep_gates_sets_only_the_keep_gate():
    params = open_keep_gates(init_params(small("lstm", "bahdanau")), "lstm", 1.0)
    for part in ("encoder", "decoder"):
        cell = params[part]["cell"]
        assert bool(jnp.all(cell["hf"]["bias"] == 1.0))
        assert bool(jnp.all(cell["hi"]["bias"] == 0.0))


@pytest.mark.parametrize("cell,attention", [("gru", None), ("gru", "bahdanau"),
                                            ("lstm", "luong"), ("rnn", "bahdanau")])
def test_every_parameter_has_logical_axes_and_shards(cell, attention):
    config = get_config("rnn-seq2seq" if attention is None else "rnn-seq2seq-attn",
                        cell=cell, attention=attention)
    boxed = jax.eval_shape(functools.partial(registry.init_boxed, config), jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim and all(x.names) for x in leaves)
    # the names map onto the mesh without using one mesh axis twice in a parameter
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    small_config = config.replace(**SMALL)
    placed = place_params(init_params(small_config), small_config, mesh)
    assert placed["out"]["kernel"].sharding.spec[1] == "tensor"


def test_bad_inputs_fail_clearly():
    config = small("rnn", "luong")
    params, fwd = init_params(config), jitted(config, None)
    src, tgt = tokens(15, SRC, 40), tokens(16, TGT, 48)
    with pytest.raises(ValueError, match=r"src_BS must be .*\[batch, length\]"):
        fwd(params, src[0], tgt)
    with pytest.raises(ValueError, match="one True/False per token"):
        fwd(params, src, tgt, jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="source batch 2 != target batch 1"):
        fwd(params, src, tgt[:1])
    final, _ = runner(config)(params, src, tgt, full(SRC))
    with pytest.raises(ValueError, match="needs the encoder memory"):
        jitted(config, "decode")(params, tgt, RNNState(carry=final, feed=final))
    with pytest.raises(ValueError, match="state must be an RNNState .*got dict"):
        jitted(config, "decode")(params, tgt, {"carry": final, "feed": final})
