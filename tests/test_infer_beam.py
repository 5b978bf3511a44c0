"""Beam search: equal to transformers' (sequences and scores) on tiny random GPT-2 and Llama
checkpoints for every early_stopping meaning and several length penalties, EOS lists and
processors; and a wide canonical beam finds the best sequence of a tiny model of every
family, checked against scoring every possible sequence with the plain forward pass."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_infer_generate import _forward, zoo

from fmzoo.infer import generate

V, EOS, N = 4, 3, 3  # vocabulary, end token, new tokens: 1 + 3 + 9 + 36 = 49 sequences
TINY_VOCAB = {
    "gpt": dict(vocab_size=V, max_len=16, pad_id=0, bos_id=0, eos_id=EOS),
    "encdec": dict(src_vocab_size=V, tgt_vocab_size=V, max_len=16, pad_id=0, bos_id=0,
                   eos_id=EOS),
    "rnn-attn": dict(src_vocab_size=V, tgt_vocab_size=V, max_len=16, pad_id=0, bos_id=0,
                     eos_id=EOS),
}


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
        # 16 beams hold every live prefix (9 at most) and every step's best candidates (at
        # the last step all have N tokens, so score order is log-prob order): the canonical
        # search (early_stopping="never") is exact
        got = generate(model, params, prompts, max_new_tokens=N, num_beams=16, eos_id=EOS,
                       length_penalty=alpha, early_stopping="never")
        for prompt, beam_out in zip(prompts, got):
            logp = exhaustive_log_probs(model, params, prompt, seqs)
            scores, greedy_out = scores_and_greedy(logp, seqs, alpha)
            assert beam_out in seqs, (family, beam_out)
            np.testing.assert_allclose(scores[seqs.index(beam_out)], scores.max(), atol=1e-5,
                                       err_msg=family)
            beats_greedy.append(scores[seqs.index(greedy_out)] < scores.max() - 1e-4)
    assert any(beats_greedy)


# ------------------------------------------------------------------ parity with transformers


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """name -> (fmzoo Loaded, transformers model) for tiny random GPT-2 and Llama."""
    from test_hf import _save_hf
    from fmzoo.models.hf import from_hf
    out = {}
    for name in ("gpt2-untied", "llama-gqa-untied"):
        directory = str(tmp_path_factory.mktemp(name))
        hf = _save_hf(name, directory)
        out[name] = (from_hf(directory), hf)
    return out


def _hf_beams(model, prompt, **kw):
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), do_sample=False, pad_token_id=0,
            return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences[0, len(prompt):].tolist(), float(out.sequences_scores[0])


def _ours(loaded, prompt, **kw):
    return generate(loaded.model, loaded.params, [prompt], **kw)[0]


@pytest.mark.parametrize("name", ["gpt2-untied", "llama-gqa-untied"])
def test_beam_search_matches_transformers(hf_pair, name):
    loaded, hf = hf_pair[name]
    rng = np.random.RandomState(7)
    prompts = [rng.randint(3, 96, n).tolist() for n in (5, 8)]
    # per prompt an EOS the model proposes early: its 3rd greedy token
    eos = [g[2] for g in generate(loaded.model, loaded.params, prompts, max_new_tokens=3)]
    outputs = {i: set() for i in range(len(prompts))}
    settings = [(lp, es) for lp in (1.0, 0.0, -0.5) for es in (True, False, "never")]
    if name.startswith("llama"):
        settings = [(1.0, "never"), (1.0, True), (-0.5, False), (0.0, True)]
    for lp, es in settings:
        for i, prompt in enumerate(prompts):
            kw = dict(num_beams=4, max_new_tokens=7, length_penalty=lp, early_stopping=es)
            want, _ = _hf_beams(hf, prompt, eos_token_id=eos[i], **kw)
            got = _ours(loaded, prompt, eos_id=eos[i], **kw)
            assert got == want, (lp, es, prompt)
            outputs[i].add(tuple(got))
    # the settings do change the answer (the comparison bites)
    assert max(len(o) for o in outputs.values()) >= 2


def test_beam_scores_eos_lists_and_processors_match_transformers(hf_pair):
    loaded, hf = hf_pair["gpt2-untied"]
    prompt = [5, 17, 42, 9, 33, 61]
    free = generate(loaded.model, loaded.params, [prompt], max_new_tokens=6)[0]
    eos = [free[1], free[3]]
    for kw in (dict(), dict(repetition_penalty=1.5), dict(min_new_tokens=4)):
        base = dict(num_beams=3, max_new_tokens=8, length_penalty=1.0, early_stopping=False)
        want, want_score = _hf_beams(hf, prompt, eos_token_id=eos, **base, **kw)
        from fmzoo.infer.decoder import decoder_for
        from fmzoo.infer.generate import _pack, plan
        from fmzoo.infer.processors import eos_array
        from fmzoo.infer.sampling import sampling_settings
        got = _ours(loaded, prompt, eos_id=eos, **base, **kw)
        assert got == want, kw
        # the score transformers reports: log-prob sum / new tokens ** length_penalty
        dec, _ = decoder_for(loaded.model, plan(loaded.model, [prompt], 8, 3, n_eos=2))
        toks, mask, live = _pack([prompt], dec.shape.rows // 3, dec.shape.width)
        state = dec.prefill(loaded.params, dec.alloc(), toks, mask, live)
        settings = sampling_settings(repetition_penalty=kw.get("repetition_penalty", 1.0),
                                     min_new_tokens=kw.get("min_new_tokens", 0))
        _, score, _ = dec.beam(loaded.params, state, eos_array(eos), jnp.int32(8),
                               jnp.float32(1.0), settings)
        np.testing.assert_allclose(float(score[0]), want_score, rtol=1e-4)
