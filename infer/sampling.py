"""Choosing the next token: pure functions of logits [B, V] and an explicit PRNG key.

Greedy is the argmax. Sampling follows transformers' warpers, in their order: divide by the
temperature; top-k keeps every token scoring at least the k-th largest (ties at the boundary
kept, as transformers' TopKLogitsWarper does); top-p then works on the distribution that
top-k left (transformers' TopPLogitsWarper): sorted ascending, a token goes when the mass of
it and every less likely token is <= 1 - top_p, which keeps the smallest set of most likely
tokens reaching top_p. Summing in ascending order keeps that mass exact for large
vocabularies (a descending float32 cumsum over 128K tokens drifts enough to drop tail tokens
even at top_p = 1). top_k = 0 and top_p = 1 switch their cut off entirely.

One documented difference: where several tokens tie at the top-p cut-off value, all of them
are kept (transformers keeps whichever its sort puts first), so the result never depends on
token order.

The settings are traced values in a typed pytree (`SamplingSettings`), so changing them does
not recompile: top-k uses one sort instead of lax.top_k, whose k must be static.

Shape letters: B batch (rows sampled independently), V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
MIN_TEMPERATURE = 1e-6  # below this x / T overflows fp32 for ordinary logits


def greedy(logits_BV: Array) -> Array:
    """The most likely token per row, int32 [B] (the lowest id among exact ties)."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def filter_logits(logits_BV: Array, top_k: Array | int = 0, top_p: Array | float = 1.0) -> Array:
    """Logits (fp32) with -inf outside the top-k, then outside the top-p nucleus."""
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[-1]
    asc_BV = jnp.sort(logits_BV, axis=-1)  # one ascending sort serves both cuts
    top_k = jnp.asarray(top_k, jnp.int32)
    k = jnp.clip(top_k, 1, V)
    kth_B1 = jnp.take_along_axis(asc_BV, jnp.broadcast_to(V - k, (asc_BV.shape[0], 1)), axis=-1)
    use_k = top_k > 0
    logits_BV = jnp.where(use_k & (logits_BV < kth_B1), -jnp.inf, logits_BV)
    asc_BV = jnp.where(use_k & (asc_BV < kth_B1), -jnp.inf, asc_BV)  # still ascending
    # Nucleus on what top-k kept: the removed tokens are a prefix of the ascending order.
    mass_BV = jnp.cumsum(jax.nn.softmax(asc_BV, axis=-1), axis=-1)
    top_p = jnp.asarray(top_p, jnp.float32)
    removed_BV = (mass_BV <= 1 - top_p).at[:, -1].set(False)  # the most likely always stays
    n_removed_B1 = jnp.sum(removed_BV, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(asc_BV, n_removed_B1, axis=-1)
    return jnp.where((top_p < 1) & (logits_BV < cutoff_B1), -jnp.inf, logits_BV)


def sample(key: Array, logits_BV: Array, temperature: Array | float = 1.0,
           top_k: Array | int = 0, top_p: Array | float = 1.0) -> Array:
    """One token per row, int32 [B], drawn from the tempered, filtered distribution."""
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), MIN_TEMPERATURE)
    scaled_BV = logits_BV.astype(jnp.float32) / t
    return jax.random.categorical(key, filter_logits(scaled_BV, top_k, top_p),
                                  axis=-1).astype(jnp.int32)


@struct.dataclass
class SamplingSettings:
    """A request's decoding settings as traced scalars (a new value does not recompile)."""

    temperature: Array  # f32; 0 = greedy (the static do_sample switch decides)
    top_k: Array  # i32; 0 = no top-k cut
    top_p: Array  # f32; 1 = no nucleus cut
    repetition_penalty: Array  # f32; 1 = off (infer/processors.py)
    min_new_tokens: Array  # i32; EOS ids are masked until this many new tokens


def sampling_settings(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, min_new_tokens: int = 0
                      ) -> SamplingSettings:
    """The settings as 0-d arrays with fixed dtypes, so every request shares one trace.
    Checking the values (ranges, types) is the caller's job: fmzoo.infer.generate does it."""
    return SamplingSettings(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                            jnp.float32(repetition_penalty), jnp.int32(min_new_tokens))


def next_token(key: Array, logits_BV: Array, settings: SamplingSettings, do_sample: bool) -> Array:
    """Greedy when `do_sample` is False (a static choice), else `sample` with the settings."""
    if not do_sample:
        return greedy(logits_BV)
    return sample(key, logits_BV, settings.temperature, settings.top_k, settings.top_p)


def log_probs(logits_BV: Array) -> Array:
    """log softmax in fp32 (beam scores add these up)."""
    return jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
