"""Rollout log-probs: the log-prob the decoder records for each sampled (or greedy) token
equals the one a training forward recomputes from prompt + completion (the classic silent
bug of RL fine-tuning: a position, temperature or padding off by one)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.infer import generate
from fmzoo.infer.generate import GenerationError
from fmzoo.models import build, get_config
from fmzoo.models.registry import init


def teacher_forced_logprobs(model, params, prompts, completions, temperature):
    """Each completion's log-probs from one forward pass over prompt + completion (rows
    right-padded: a causal model's earlier positions do not see the padding)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids)), np.float64)
    lp = logits / temperature
    lp = lp - lp.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return [lp[b, np.arange(len(p) - 1, len(p) - 1 + len(c)), c]
            for b, (p, c) in enumerate(zip(prompts, completions))]


def test_sampled_logprobs_equal_the_training_forward():
    # rotary positions (tests/test_rl.py covers learned ones through train.rollout)
    config = get_config("llama-tiny", n_layers=2, d_model=64, n_heads=4, d_ff=128,
                        max_len=64)
    model, params = build(config), init(config, 3)
    # prompts of several lengths: rows are padded differently in the batch
    prompts = [[5, 17, 99, 3], [8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 7]]
    common = dict(max_new_tokens=6, rng=11, eos_id=[1, 2])
    for temperature, top_k in ((1.3, 20), (0.0, 0)):
        toks, logps = generate(model, params, prompts, temperature=temperature, top_k=top_k,
                               return_logprobs=True, **common)
        want = teacher_forced_logprobs(model, params, prompts, toks,
                                       temperature if temperature > 0 else 1.0)
        for c, lp, w in zip(toks, logps, want):
            assert len(lp) == len(c) > 0
            np.testing.assert_allclose(lp, w, atol=2e-5, rtol=1e-5)
    # asking for the log-probs leaves the sampled tokens unchanged
    assert generate(model, params, prompts, temperature=1.3, top_k=20, **common) == \
        generate(model, params, prompts, temperature=1.3, top_k=20, return_logprobs=True,
                 **common)[0]


def test_logprobs_with_beams_are_refused():
    config = get_config("gpt-tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                        max_len=32)
    with pytest.raises(GenerationError, match="num_beams=1"):
        generate(build(config), init(config, 0), [[3, 4]], max_new_tokens=2, num_beams=2,
                 return_logprobs=True)
