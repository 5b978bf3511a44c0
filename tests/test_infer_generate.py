"""Prefill + decode against full recomputation, batching, EOS, seeds, validation, shapes
compiled once, donation, context limits, sharded generation, CLI."""

import contextlib
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmzoo
from fmzoo.infer import GenerateStats, GenerationError, generate, stream
from fmzoo.infer.generate import plan
from fmzoo.models import build, get_config, init
from fmzoo.models.cache import EncDecCache, KVCache, RNNState

TINY = {
    "gpt": ("gpt-tiny", dict(n_layers=2, d_model=64, d_ff=128, max_len=64), 0.2),
    "llama": ("llama-tiny", dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                                 max_len=64), 0.2),
    # untied, pre-LN and perturbed: a random post-LN tied model mostly repeats one token
    "encdec": ("transformer-seq2seq", dict(n_encoder_layers=1, n_decoder_layers=2, d_model=64,
                                           d_ff=128, max_len=64, pre_ln=True,
                                           share_embeddings=False), 0.2),
    "rnn": ("rnn-seq2seq", dict(d_embed=16, d_hidden=32, max_len=64), 0.0),
    "rnn-attn": ("rnn-seq2seq-attn", dict(d_embed=16, d_hidden=32, max_len=64), 0.0),
    # the other cells and the dot (Luong, input-feeding) attention carry different states
    "lstm-luong": ("rnn-seq2seq-attn", dict(cell="lstm", attention="luong", d_embed=16,
                                            d_hidden=32, max_len=64), 0.0),
    "tanh-vanilla": ("rnn-seq2seq", dict(cell="rnn", d_embed=16, d_hidden=32, max_len=64), 0.0),
}
PROMPTS = [[5, 17, 42], [7, 1, 99, 3, 12, 250, 8, 8, 60], [200, 30, 31, 44, 9]]


def perturb(params, scale, seed=1):
    """Random weights further from uniform logits, so greedy paths are varied and untied."""
    if not scale:
        return params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def zoo(family, **overrides):
    preset, kw, scale = TINY[family]
    config = get_config(preset, **{**kw, **overrides})
    make = jax.jit(lambda key: perturb(init(config, key), scale))  # jit: eager init is slow
    return build(config), make(jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda params, *xs: model.apply({"params": params}, *xs))


def greedy_by_recompute(model, params, prompts, n):
    """Greedy tokens from a fresh full forward pass over each whole prefix at every step.

    No cache: each step reruns the model on [prompt + tokens so far] for every row (rows
    right-padded to one buffer; causal attention keeps the tail out of a row's logits).
    """
    c, B = model.config, len(prompts)
    out = [[] for _ in prompts]
    for t in range(n):
        if hasattr(c, "flavor"):
            buf = np.zeros((B, max(map(len, prompts)) + n - 1), np.int32)  # last token not fed
            for b, p in enumerate(prompts):
                buf[b, :len(p) + t] = p + out[b]
            logits = _forward(model)(params, jnp.asarray(buf))
            rows = [logits[b, len(p) + t - 1] for b, p in enumerate(prompts)]
        else:
            src = np.zeros((B, max(map(len, prompts))), np.int32)
            for b, p in enumerate(prompts):
                src[b, :len(p)] = p
            tgt = np.full((B, n), c.bos_id, np.int32)
            for b in range(B):
                tgt[b, 1:t + 1] = out[b]
            logits = _forward(model)(params, jnp.asarray(src), jnp.asarray(tgt),
                                     jnp.asarray(src > 0))
            rows = [logits[b, t] for b in range(B)]
        for b in range(B):
            out[b].append(int(jnp.argmax(rows[b])))
    return out


# ----------------------------------------------------------------- cache == recomputation


@pytest.mark.parametrize("family", list(TINY))
def test_cached_greedy_equals_full_recompute(family):
    model, params = zoo(family)
    got = generate(model, params, PROMPTS, max_new_tokens=6)
    want = greedy_by_recompute(model, params, PROMPTS, 6)
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # prompts do lead to different text


def _method(model, name):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=getattr(model, name)))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_prefill_equals_teacher_forcing_and_single_decode_steps(family):
    model, params = zoo(family)
    c = model.config
    toks = jnp.asarray([[3, 9, 27, 81, 4, 16, 64], [10, 20, 30, 40, 0, 0, 0]], jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], bool)
    full = _forward(model)(params, toks)  # causal: row 1's pads do not reach its first 4
    prefill, step = _method(model, "prefill"), _method(model, "decode_step")
    cache0 = model.init_cache(2, 12)
    assert isinstance(cache0, KVCache) and cache0.k[0].shape == (2, 12, c.n_kv_heads,
                                                                 c.dim_per_head)
    logits_last, cache_all = prefill(params, toks, mask, cache0)
    assert logits_last.shape == (2, c.vocab_size)  # the last real position only, no [B, T, V]
    np.testing.assert_allclose(logits_last[0], full[0, 6], atol=1e-5)
    np.testing.assert_allclose(logits_last[1], full[1, 3], atol=1e-5)
    # a one-token prefill, then one decode step per token, rebuild the same cache
    logits, cache = prefill(params, toks[:, :1], mask[:, :1], model.init_cache(2, 12))
    np.testing.assert_allclose(logits, full[:, 0], atol=1e-5)
    for t in range(1, 4):
        logits, cache = step(params, toks[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5)
    assert cache_all.lengths.tolist() == [7, 4] and cache.lengths.tolist() == [4, 4]
    for name in ("k", "v"):
        for a, b in zip(getattr(cache, name), getattr(cache_all, name)):
            np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)


def test_every_family_returns_its_own_cache_type_from_prefill_and_decode_step():
    for family, kind in [("gpt", KVCache), ("encdec", EncDecCache), ("rnn-attn", RNNState),
                         ("lstm-luong", RNNState), ("rnn", RNNState)]:
        model, params = zoo(family)
        cache0 = model.init_cache(2, 8, 5)
        src = jnp.asarray([[4, 8, 15, 16, 23], [42, 7, 1, 0, 0]], jnp.int32)
        logits, cache = _method(model, "prefill")(params, src, src > 0, cache0)
        logits2, cache2 = _method(model, "decode_step")(params, jnp.argmax(logits, -1), cache)
        shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
        assert type(cache) is type(cache2) is kind
        assert shapes(cache0) == shapes(cache) == shapes(cache2)  # fixed shapes: loop-carry-able
        assert logits.shape == logits2.shape == (2, model.config.vocab_size)


def test_encdec_cached_decoder_equals_teacher_forcing():
    model, params = zoo("encdec", pre_ln=False, share_embeddings=True)  # the paper's layout
    src = jnp.asarray([[4, 8, 15, 16, 23], [42, 7, 0, 0, 0]], jnp.int32)
    src_mask = src > 0
    tgt = jnp.asarray([[257, 11, 12, 13, 14, 15]] * 2, jnp.int32)
    full = _forward(model)(params, src, tgt, src_mask)
    logits, cache = _method(model, "prefill")(params, src, src_mask, model.init_cache(2, 8, 5))
    np.testing.assert_allclose(logits, full[:, 0], atol=1e-5)
    step = _method(model, "decode_step")
    for t in range(1, 6):
        logits, cache = step(params, tgt[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "encdec", "rnn-attn"])
def test_continuation_is_the_same_alone_and_in_a_batch(family):
    model, params = zoo(family)
    p = [9, 8, 7, 6, 5]
    alone = generate(model, params, [p], max_new_tokens=5)[0]
    batch = generate(model, params, [[1, 2], p, list(range(40, 60))], max_new_tokens=5)
    assert batch[1] == alone


# -------------------------------------------------------------------- EOS, sampling, seeds


def test_output_is_cut_after_eos_per_sequence():
    model, params = zoo("gpt")
    free = generate(model, params, PROMPTS, max_new_tokens=8)
    eos = free[0][2]
    cut = generate(model, params, PROMPTS, max_new_tokens=8, eos_id=eos)
    for f, g in zip(free, cut):
        want = f[:f.index(eos) + 1] if eos in f else f
        assert g == want
    assert cut[0][-1] == eos and len(cut[0]) <= 3


def test_top_k_1_and_tiny_top_p_generate_greedy():
    model, params = zoo("llama")
    want = generate(model, params, PROMPTS, max_new_tokens=6)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert generate(model, params, PROMPTS, max_new_tokens=6, temperature=1.5, rng=3,
                        **kw) == want


def test_same_seed_same_samples():
    model, params = zoo("gpt")
    run = lambda seed: generate(model, params, PROMPTS, max_new_tokens=8,  # noqa: E731
                                temperature=1.0, rng=seed)
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != generate(model, params, PROMPTS, max_new_tokens=8)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_yields_the_tokens_of_generate(temperature):
    model, params = zoo("llama")
    kw = dict(max_new_tokens=7, temperature=temperature, top_k=20, rng=5)
    stats = GenerateStats(0, 0, 0, 0.0, 0.0, False)
    streamed = list(stream(model, params, PROMPTS[1], stats=stats, **kw))
    assert streamed == generate(model, params, [PROMPTS[1]], **kw)[0]
    assert stats.new_tokens == 7 and stats.prompt_tokens == 9 and stats.ttft_s > 0


# ---------------------------------------------------------------- validation and buckets


BAD = [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[1, 2, 3]), "wrap it"),
    (dict(prompts="hello"), "not text"),
    (dict(prompts=[[1, 264]]), r"outside the vocabulary \[0, 264\)"),
    (dict(prompts=[[-1]]), "outside the vocabulary"),
    (dict(prompts=[[1.5, 2]]), "integer token ids"),
    (dict(max_new_tokens=58), r"exceeds the model's max_len 64 \+ 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, temperature=0.7), "cannot be combined with sampling"),
    (dict(eos_id=300), r"eos_id must be None, a token id or a list of token ids in \[0, 264\)"),
    (dict(eos_id=[3, 300]), r"list of token ids in \[0, 264\)"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
]


@contextlib.contextmanager
def compiles():
    """The names of the programs XLA compiles inside the block (jax.log_compiles)."""
    names, logger = [], logging.getLogger("jax")

    class Grab(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                names.append(msg.split()[1])
    handler = Grab(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("kw,match", BAD, ids=[m for _, m in BAD])
def test_bad_requests_fail_before_compiling(kw, match):
    model, params = zoo("gpt")
    kw = {"prompts": [[1, 2, 3, 4, 5, 6, 7, 8]], "max_new_tokens": 4, **kw}
    with compiles() as names, pytest.raises(GenerationError, match=match):
        generate(model, params, **kw)
    assert names == []


def test_seq2seq_limits_are_source_and_new_tokens_separately():
    model, params = zoo("rnn")
    with pytest.raises(GenerationError, match="a source has 65 tokens"):
        generate(model, params, [[1] * 65], max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_new_tokens=65 exceeds"):
        generate(model, params, [[1] * 60], max_new_tokens=65)


def test_a_request_shape_compiles_once():
    model, params = zoo("gpt")
    with compiles() as first:
        _, stats = generate(model, params, [[1] * 5, [2] * 3, [3] * 2], max_new_tokens=5,
                            return_stats=True)
        generate(model, params, [[1] * 5], max_new_tokens=3)
        generate(model, params, [[1] * 5, [2] * 3, [3]], max_new_tokens=5, repetition_penalty=1.2)
    assert stats.compiled and any("prefill" in n for n in first)
    assert any("decode" in n for n in first)
    # prompt length 5 -> 7 (bucket 8), batch 3 -> 4 (bucket 4), new tokens 5 -> 7 (bucket 8),
    # other eos ids, penalty values: all traced or bucketed (whether penalties are on at
    # all is part of the shape)
    with compiles() as second:
        _, stats = generate(model, params, [[4] * 7, [5] * 2, [6], [7] * 6], max_new_tokens=7,
                            eos_id=[3, 9], repetition_penalty=1.3, min_new_tokens=2,
                            return_stats=True)
        generate(model, params, [[4] * 7, [5] * 2, [6]], max_new_tokens=6, eos_id=3)
        list(stream(model, params, [4] * 7, max_new_tokens=3))  # same prefill, its own step
    assert second == [n for n in second if "step" in n or "choose" in n] and not stats.compiled
    with compiles() as third:
        generate(model, params, [[4] * 9], max_new_tokens=7)  # length 9: the next bucket
    assert third


def test_stats_report_time_to_first_token_and_decode_speed():
    model, params = zoo("gpt")
    tokens, stats = generate(model, params, PROMPTS, max_new_tokens=6, return_stats=True)
    assert stats.batch == 3 and stats.prompt_tokens == sum(map(len, PROMPTS))
    assert stats.new_tokens == sum(map(len, tokens)) == 18
    assert stats.ttft_s > 0 and stats.decode_s > 0 and stats.decode_tokens_per_s > 0


@pytest.mark.parametrize("family", ["gpt", "encdec"])
def test_decode_updates_the_donated_cache_in_place(family):
    """prefill and decode take the state donated and alias it to their output, so the decode
    loop updates the cache in place rather than copying it."""
    import re
    from fmzoo.infer.decoder import decoder_for
    from fmzoo.infer.processors import eos_array
    from fmzoo.infer.sampling import sampling_settings
    from fmzoo.infer.generate import _pack
    model, params = zoo(family)
    dec, _ = decoder_for(model, plan(model, PROMPTS, 6))
    toks, mask, live = _pack(PROMPTS, dec.shape.rows, dec.shape.width)
    cache = dec.alloc()
    state = dec.prefill(params, cache, toks, mask, live)
    assert all(x.is_deleted() for x in jax.tree.leaves(cache))  # consumed, not copied
    args = (params, state, jax.random.key(0), sampling_settings(), eos_array(None),
            jnp.int32(6))
    lowered = dec._decode.lower(*args)
    out, _ = dec.decode(*args)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.cache))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    (p_info, state_info, *rest), _ = jax.tree.map(lambda i: i.donated, lowered.args_info)
    assert all(jax.tree.leaves(state_info)) and not any(jax.tree.leaves((p_info, rest)))
    # ... and every cache buffer is aliased to an output (the state it returns), so XLA
    # writes the new cache into the old one's memory instead of a second copy
    aliased = re.findall(r"%arg\d+: [^%]*?tf\.aliasing_output = \d+", lowered.as_text())
    assert len(aliased) >= len(jax.tree.leaves(state.cache))
    assert np.asarray(out).shape[0] == dec.shape.rows


# ------------------------------------------------------------------------- context limits


def test_prompt_plus_new_tokens_may_reach_max_len_plus_one():
    model, params = zoo("gpt")  # learned positions: max_len 64 is a hard limit
    prompt = [[(7 * i) % 250 + 1 for i in range(60)]]
    got = generate(model, params, prompt, max_new_tokens=5)  # positions 0..63 are fed
    assert got == greedy_by_recompute(model, params, prompt, 5)
    with pytest.raises(GenerationError, match="lower max_new_tokens to 5"):
        generate(model, params, prompt, max_new_tokens=6)


def test_rope_model_generates_past_its_trained_length_with_a_warning():
    model, params = zoo("llama")  # max_len 64
    prompt = [[(5 * i) % 250 + 1 for i in range(60)]]
    with pytest.warns(UserWarning, match="not trained at these lengths"):
        got = generate(model, params, prompt, max_new_tokens=12)
    assert got == greedy_by_recompute(model, params, prompt, 12)


# ------------------------------------------------------------------------ stopping, sharded


def test_any_of_several_eos_ids_stops_a_row():
    model, params = zoo("gpt")
    free = generate(model, params, PROMPTS, max_new_tokens=8)
    first, second = free[0][4], free[1][2]
    cut = generate(model, params, PROMPTS, max_new_tokens=8, eos_id=[first, second])
    for f, g in zip(free, cut):
        hits = [i for i, t in enumerate(f) if t in (first, second)]
        assert g == (f[:hits[0] + 1] if hits else f)
    assert len(cut[1]) <= 3 and len(cut[0]) <= 5


@pytest.mark.parametrize("family", ["llama", "encdec"])
def test_generation_sharded_over_a_mesh_equals_one_device(family):
    from jax.sharding import PartitionSpec as P
    from fmzoo.infer.decoder import decoder_for
    from fmzoo.models.sharding import MESH_AXES
    model, params = zoo(family)
    mesh = jax.make_mesh((2, 2, 2), MESH_AXES)
    prompts = PROMPTS + [[11, 12, 13]]  # 4 rows: batch splits over data x fsdp
    want = generate(model, params, prompts, max_new_tokens=6)
    got = generate(model, params, prompts, max_new_tokens=6, mesh=mesh)
    assert got == want
    # the cache really is split: rows over data x fsdp, kv heads over tensor
    dec, _ = decoder_for(model, plan(model, prompts, 6), mesh)
    kv = dec.alloc()
    k = (kv if family == "llama" else kv.self_attn).k[0]
    assert k.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    if family == "llama":  # beams reorder the sharded cache rows
        beams = dict(max_new_tokens=4, num_beams=2)
        assert (generate(model, params, prompts[:2], mesh=mesh, **beams)
                == generate(model, params, prompts[:2], **beams))


# ----------------------------------------------------------------------------------- CLI


def test_cli_streams_the_generated_text(capsys):
    from fmzoo.cli import main
    assert main(["generate", "--model", "gpt-tiny", "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    model, params, config, tok = fmzoo.load("gpt-tiny")
    tokens = generate(model, params, [tok.encode("hi", add_bos=True)], max_new_tokens=5,
                      eos_id=tok.eos_id)[0]
    assert out == tok.decode(tokens) + "\n" and len(out) > 1
    assert "time to first token" in err and "tokens/s" in err


def test_cli_reports_a_bad_flag(capsys):
    from fmzoo.cli import main
    assert main(["generate", "--model", "gpt-tiny", "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p must lie in (0, 1]" in capsys.readouterr().err
