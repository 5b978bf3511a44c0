"""fmzoo.infer: KV cache, prefill + decode engines, sampling, beam search, generate."""

from .beam import beam_search
from .cache import cache_bytes, gather_batch, init_cache, repeat_batch
from .engine import EncDecEngine, LMEngine, RNNEngine, make_engine
from .generate import GenerateStats, GenerationError, generate, stream, validate
from .sampling import filter_logits, greedy, log_probs, next_token, sample

__all__ = [
    "beam_search", "cache_bytes", "gather_batch", "init_cache", "repeat_batch",
    "EncDecEngine", "LMEngine", "RNNEngine", "make_engine",
    "GenerateStats", "GenerationError", "generate", "stream", "validate",
    "filter_logits", "greedy", "log_probs", "next_token", "sample",
]
