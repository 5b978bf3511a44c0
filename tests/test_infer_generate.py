"""Prefill + decode against full recomputation, batching, EOS, seeds, validation, buckets, CLI."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmzoo
from fmzoo.infer import GenerateStats, GenerationError, generate, init_cache, make_engine, stream
from fmzoo.infer.generate import compiled_count
from fmzoo.models import build, get_config, init

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
            buf = np.zeros((B, max(map(len, prompts)) + n), np.int32)
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


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_prefill_equals_single_decode_steps(family):
    model, params = zoo(family)
    c = model.config
    toks = jnp.asarray([[3, 9, 27, 81, 4, 16, 64], [10, 20, 30, 40, 0, 0, 0]], jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], bool)
    apply = jax.jit(lambda t, m, cache: model.apply({"params": params}, t, padding_mask_BT=m,
                                                    cache=cache))
    logits_all, cache_all = apply(toks, mask, init_cache(c, 2, 12))
    cache = init_cache(c, 2, 12)
    for t in range(7):  # one token per call; padded rows do not advance
        logits_t, cache = apply(toks[:, t:t + 1], mask[:, t:t + 1], cache)
        for b in range(2):
            if mask[b, t]:
                np.testing.assert_allclose(logits_t[b, 0], logits_all[b, t], atol=1e-5)
    assert cache["lengths"].tolist() == cache_all["lengths"].tolist() == [7, 4]
    for layer_a, layer_b in zip(cache["layers"], cache_all["layers"]):
        assert layer_a["k"].shape[2] == c.n_kv_heads  # GQA caches kv heads only
        for b, n in enumerate([7, 4]):
            for name in ("k", "v"):
                np.testing.assert_allclose(layer_a[name][b, :n], layer_b[name][b, :n], atol=1e-5)
    # the engine's prefill reads each row's last real token
    logits_last, _ = make_engine(model).prefill(params, init_cache(c, 2, 12), toks, mask)
    np.testing.assert_allclose(logits_last[0], logits_all[0, 6], atol=1e-5)
    np.testing.assert_allclose(logits_last[1], logits_all[1, 3], atol=1e-5)


def test_encdec_cached_decoder_equals_teacher_forcing():
    model, params = zoo("encdec", pre_ln=False, share_embeddings=True)  # the paper's layout
    src = jnp.asarray([[4, 8, 15, 16, 23], [42, 7, 0, 0, 0]], jnp.int32)
    src_mask = src > 0
    tgt = jnp.asarray([[257, 11, 12, 13, 14, 15]] * 2, jnp.int32)
    full = _forward(model)(params, src, tgt, src_mask)
    engine = make_engine(model)
    logits, carry = jax.jit(engine.prefill)(params, engine.alloc(2, 8), src, src_mask)
    np.testing.assert_allclose(logits, full[:, 0], atol=1e-5)
    step = jax.jit(engine.step)
    for t in range(1, 6):
        logits, carry = step(params, carry, tgt[:, t])
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
    (dict(max_new_tokens=60), "exceeds the model's max_len 64"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, temperature=0.7), "cannot be combined with sampling"),
    (dict(eos_id=300), r"eos_id must be None or a token id in \[0, 264\)"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m for _, m in BAD])
def test_bad_requests_fail_before_compiling(kw, match):
    model, params = zoo("gpt")
    kw = {"prompts": [[1, 2, 3, 4, 5, 6, 7, 8]], "max_new_tokens": 4, **kw}
    before = compiled_count()
    with pytest.raises(GenerationError, match=match):
        generate(model, params, **kw)
    assert compiled_count() == before


def test_seq2seq_limits_are_source_and_new_tokens_separately():
    model, params = zoo("rnn")
    with pytest.raises(GenerationError, match="a source has 65 tokens"):
        generate(model, params, [[1] * 65], max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_new_tokens=65 exceeds"):
        generate(model, params, [[1] * 60], max_new_tokens=65)


def test_a_new_length_in_the_same_bucket_does_not_recompile():
    model, params = zoo("gpt")
    _, first = generate(model, params, [[1] * 5, [2] * 3, [3] * 2], max_new_tokens=5,
                        return_stats=True)
    count = compiled_count()
    # prompt length 5 -> 7 (bucket 8), batch 3 -> 4 (bucket 4), new tokens 5 -> 7 (bucket 8),
    # other eos and temperature-free settings: all traced or bucketed
    _, second = generate(model, params, [[4] * 7, [5] * 2, [6], [7] * 6], max_new_tokens=7,
                         eos_id=3, return_stats=True)
    assert compiled_count() == count
    assert first.compiled and not second.compiled
    generate(model, params, [[4] * 9], max_new_tokens=7)  # length 9: the next bucket
    assert compiled_count() > count


def test_stats_report_time_to_first_token_and_decode_speed():
    model, params = zoo("gpt")
    tokens, stats = generate(model, params, PROMPTS, max_new_tokens=6, return_stats=True)
    assert stats.batch == 3 and stats.prompt_tokens == sum(map(len, PROMPTS))
    assert stats.new_tokens == sum(map(len, tokens)) == 18
    assert stats.ttft_s > 0 and stats.decode_s > 0 and stats.decode_tokens_per_s > 0


@pytest.mark.parametrize("family", ["gpt", "encdec"])
def test_generate_donates_the_decode_cache(family, monkeypatch):
    """generate's one program takes the preallocated cache donated and aliased to its output,
    so the decode loop updates the cache in place rather than copying it."""
    import re
    import sys
    gen = sys.modules["fmzoo.infer.generate"]
    real, seen = gen._generate_fused, {}

    def spy(engine, params, carry, *args, **kwargs):
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding),
                              (params, carry, args))
        seen.update(engine=engine, carry=carry, shapes=shapes, kwargs=kwargs)
        return real(engine, params, carry, *args, **kwargs)
    monkeypatch.setattr(gen, "_generate_fused", spy)
    model, params = zoo(family)
    got = generate(model, params, PROMPTS, max_new_tokens=6)
    assert [len(t) for t in got] == [6, 6, 6]
    cache = jax.tree.leaves(seen["carry"])
    assert cache and all(x.is_deleted() for x in cache)  # the caller's buffers were consumed
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    p, c, a = seen["shapes"]
    lowered = real.lower(seen["engine"], p, c, *a, **seen["kwargs"])
    (_, donated_cache, *others), _ = jax.tree.map(lambda i: i.donated, lowered.args_info)
    assert all(jax.tree.leaves(donated_cache)) and not any(jax.tree.leaves(others))
    # ... and each cache buffer is aliased to an output of the program (the cache it returns),
    # so XLA writes the new cache into the old one's memory instead of a second copy
    aliased = re.findall(r"%arg(\d+): [^%]*?tf\.aliasing_output = \d+", lowered.as_text())
    n_params = len(jax.tree.leaves(p))
    assert sorted(map(int, aliased)) == list(range(n_params, n_params + len(cache)))


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
