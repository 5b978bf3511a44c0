"""fmzoo.infer: one decoder per request shape (prefill + decode over the model's own cache),
sampling, history processors, beam search, generate and stream."""

from .beam import beam_search
from .decoder import DecodeState, Decoder, Shape, decoder_for
from .generate import GenerateStats, GenerationError, generate, stream, validate
from .sampling import filter_logits, greedy, log_probs, next_token, sample, sampling_settings

__all__ = [
    "beam_search", "DecodeState", "Decoder", "Shape", "decoder_for",
    "GenerateStats", "GenerationError", "generate", "stream", "validate",
    "filter_logits", "greedy", "log_probs", "next_token", "sample", "sampling_settings",
]
