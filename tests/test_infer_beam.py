"""Beam search: width 1 is greedy; a wide enough beam finds the best sequence of a tiny model,
checked against scoring every possible sequence with the plain forward pass."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_infer_generate import PROMPTS, _forward, greedy_by_recompute, zoo

from fmzoo.infer import beam_search, generate, make_engine
from fmzoo.infer.generate import _pack

V, EOS, N = 4, 3, 3  # vocabulary, end token, new tokens: 1 + 3 + 9 + 36 = 49 sequences
TINY_VOCAB = {
    "gpt": dict(vocab_size=V, max_len=16, pad_id=0, bos_id=0, eos_id=EOS),
    "encdec": dict(src_vocab_size=V, tgt_vocab_size=V, max_len=16, pad_id=0, bos_id=0,
                   eos_id=EOS),
    "rnn-attn": dict(src_vocab_size=V, tgt_vocab_size=V, max_len=16, pad_id=0, bos_id=0,
                     eos_id=EOS),
}


@functools.partial(jax.jit, static_argnames=("engine", "num_beams", "max_new"))
def _beams(engine, params, toks, mask, eos_id, alpha, *, num_beams, max_new):
    carry = engine.alloc(toks.shape[0], max_new + toks.shape[1], toks.shape[1])
    logits, carry = engine.prefill(params, carry, toks, mask)
    return beam_search(engine, params, carry, logits, num_beams=num_beams, n_out=max_new,
                       max_new=jnp.int32(max_new), eos_id=eos_id, length_penalty=alpha)[:2]


@pytest.mark.parametrize("family", ["gpt", "rnn-attn"])
def test_one_beam_without_eos_is_greedy(family):
    model, params = zoo(family)
    toks, mask = _pack(PROMPTS, len(PROMPTS), 16)
    tokens, _ = _beams(make_engine(model), params, jnp.asarray(toks), jnp.asarray(mask),
                       jnp.int32(-1), jnp.float32(1.0), num_beams=1, max_new=6)
    assert np.asarray(tokens).tolist() == greedy_by_recompute(model, params, PROMPTS, 6)


def all_sequences():
    """Every output of at most N tokens: stopped by EOS, or N tokens long."""
    seqs = [list(s) + [EOS] for n in range(N) for s in itertools.product(range(V - 1), repeat=n)]
    return seqs + [list(s) for s in itertools.product(range(V - 1), repeat=N - 1)
                   for s in [s + (t,) for t in range(V)]]


def exhaustive_log_probs(model, params, prompt, seqs):
    """[sequence, step, token] next-token log-probs by the full forward pass."""
    c = model.config
    padded = np.array([s + [0] * (N - len(s)) for s in seqs], np.int32)
    if hasattr(c, "flavor"):
        toks = np.concatenate([np.tile(prompt, (len(seqs), 1)), padded], 1)
        logits = _forward(model)(params, jnp.asarray(toks))[:, len(prompt) - 1:-1]
    else:
        src = jnp.asarray(np.tile(prompt, (len(seqs), 1)))
        tgt = np.concatenate([np.full((len(seqs), 1), c.bos_id), padded[:, :-1]], 1)
        logits = _forward(model)(params, src, jnp.asarray(tgt))
    return np.asarray(jax.nn.log_softmax(logits, -1))


def scores_and_greedy(logp, seqs, alpha):
    """Each sequence's sum of log-probs / len ** alpha, and the greedy sequence."""
    scores = np.array([sum(logp[i, t, tok] for t, tok in enumerate(s)) / len(s) ** alpha
                       for i, s in enumerate(seqs)])
    greedy = []
    while len(greedy) < N and EOS not in greedy:  # any sequence with this prefix will do
        i = next(i for i, s in enumerate(seqs) if s[:len(greedy)] == greedy)
        greedy.append(int(np.argmax(logp[i, len(greedy)])))
    return scores, greedy


def test_wide_beam_finds_the_best_sequence():
    """Gpt, encoder-decoder and RNN, each with another length penalty. The optimum must
    also escape greedy decoding at least once, or the comparison would prove little."""
    seqs = all_sequences()
    assert len(seqs) == 49
    beats_greedy = []
    for family, alpha in [("gpt", 1.0), ("encdec", 0.0), ("rnn-attn", 0.6)]:
        model, params = zoo(family, **TINY_VOCAB[family])
        params = jax.tree.map(lambda x: 3.0 * x, params)  # peaky enough for distinct scores
        prompts = [[1, 2, 0], [2]]
        width = (V - 1) ** (N - 1)  # every non-EOS prefix stays alive: the search is exact
        got = generate(model, params, prompts, max_new_tokens=N, num_beams=width, eos_id=EOS,
                       length_penalty=alpha)
        for prompt, beam_out in zip(prompts, got):
            logp = exhaustive_log_probs(model, params, prompt, seqs)
            scores, greedy_out = scores_and_greedy(logp, seqs, alpha)
            assert beam_out in seqs, (family, beam_out)
            np.testing.assert_allclose(scores[seqs.index(beam_out)], scores.max(), atol=1e-5,
                                       err_msg=family)
            beats_greedy.append(scores[seqs.index(greedy_out)] < scores.max() - 1e-4)
    assert any(beats_greedy)
