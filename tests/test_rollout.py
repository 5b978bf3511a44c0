"""generate(return_logprobs=True): beam search has sequence scores, not per-token log-probs.
(That the recorded log-probs equal the training forward's: tests/test_rl.py, through
train.rollout, which runs the same decoder with log-probs on.)"""

import pytest

from fmzoo.infer import generate
from fmzoo.infer.generate import GenerationError
from fmzoo.models import build, get_config
from fmzoo.models.registry import init


def test_logprobs_with_beams_are_refused():
    config = get_config("gpt-tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                        max_len=32)
    with pytest.raises(GenerationError, match="num_beams=1"):
        generate(build(config), init(config, 0), [[3, 4]], max_new_tokens=2, num_beams=2,
                 return_logprobs=True)
