"""History-dependent logits processors against transformers' definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.infer.processors import eos_array, is_eos, mark_seen, process, repetition_penalty
from fmzoo.infer.processors import seen_tokens, suppress_eos


def _scores(B=3, V=40, seed=0):
    return np.random.default_rng(seed).normal(0, 3, (B, V)).astype(np.float32)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_matches_transformers_with_left_padding(penalty):
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    B, T, V = 3, 6, 40
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (B, T))
    pad = np.array([0, 2, 5])  # left padding per row, as generate() passes it
    mask = np.arange(T)[None, :] >= pad[:, None]
    scores = _scores(B, V)
    hf = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.tensor(pad))
    want = hf(torch.tensor(ids), torch.tensor(scores)).numpy()
    seen = seen_tokens(jnp.asarray(ids), jnp.asarray(mask), V)
    got = np.asarray(repetition_penalty(jnp.asarray(scores), seen, penalty))
    np.testing.assert_array_equal(got, want)
    jitted = jax.jit(repetition_penalty)(jnp.asarray(scores), seen, jnp.float32(penalty))
    np.testing.assert_array_equal(np.asarray(jitted), want)  # the decoder runs it under jit
    if penalty != 1.0:  # padding tokens are not penalised: something changed only where seen
        assert (got != scores).any()


def test_mark_seen_adds_generated_tokens_to_the_penalised_set():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    ids = np.array([[3, 5], [7, 7]])
    new = np.array([9, 3])
    scores = _scores(2, 12, 2)
    want = RepetitionPenaltyLogitsProcessor(1.5)(
        torch.tensor(np.concatenate([ids, new[:, None]], 1)), torch.tensor(scores)).numpy()
    seen = mark_seen(seen_tokens(jnp.asarray(ids), jnp.ones((2, 2), bool), 12), jnp.asarray(new))
    np.testing.assert_array_equal(np.asarray(repetition_penalty(jnp.asarray(scores), seen, 1.5)),
                                  want)


@pytest.mark.parametrize("n_new,min_new", [(0, 3), (2, 3), (3, 3), (5, 0)])
def test_min_new_tokens_matches_transformers_with_several_eos_ids(n_new, min_new):
    import torch
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor
    B, T, V, eos = 2, 4, 30, [7, 29]
    scores = _scores(B, V, 3)
    ids = torch.zeros((B, T + n_new), dtype=torch.long)
    want = MinNewTokensLengthLogitsProcessor(T, min_new, eos)(ids, torch.tensor(scores)).numpy()
    got = suppress_eos(jnp.asarray(scores), eos_array(eos), jnp.int32(n_new), jnp.int32(min_new))
    np.testing.assert_array_equal(np.asarray(got), want)
    # per-row counts broadcast the same way
    got_B = suppress_eos(jnp.asarray(scores), eos_array(eos), jnp.full((B,), n_new, jnp.int32),
                         jnp.int32(min_new))
    np.testing.assert_array_equal(np.asarray(got_B), want)


def test_process_applies_repetition_then_min_new_like_transformers():
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)
    V, eos = 20, [4]
    ids = np.array([[4, 1, 2], [3, 3, 4]])
    scores = _scores(2, V, 4)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2),
                              MinNewTokensLengthLogitsProcessor(2, 2, eos)])
    want = hf(torch.tensor(ids), torch.tensor(scores)).numpy()  # one new token so far
    seen = seen_tokens(jnp.asarray(ids), jnp.ones((2, 3), bool), V)
    got = process(jnp.asarray(scores), seen, eos_array(eos), jnp.int32(1), jnp.float32(1.2),
                  jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_eos_array_pads_and_checks_its_size():
    assert np.asarray(eos_array([5, 9])).tolist()[:3] == [5, 9, -1]
    assert not np.asarray(is_eos(jnp.array([0, -2]), eos_array(None))).any()
    assert np.asarray(is_eos(jnp.array([9, 4]), eos_array([5, 9]))).tolist() == [True, False]
    with pytest.raises(ValueError, match="at most 8 end-of-sequence ids"):
        eos_array(list(range(9)))
