"""Choosing the next token: pure functions of logits [B, V] and an explicit PRNG key.

Greedy is the argmax. Sampling divides the logits by the temperature, keeps the top_k
most likely tokens (0 = all), then the smallest set of most likely tokens whose
probability reaches top_p (the nucleus, on the distribution renormalised after top-k,
as Hugging Face does), and draws from what is left. The settings may be traced values,
so changing them does not recompile: top-k uses one sort instead of lax.top_k, whose k
must be static. Ties at the cut-off value are kept.

Shape letters: B batch (rows sampled independently), V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
MIN_TEMPERATURE = 1e-6  # below this x / T overflows fp32 for ordinary logits


def greedy(logits_BV: Array) -> Array:
    """The most likely token per row, int32 [B] (the lowest id among exact ties)."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def filter_logits(logits_BV: Array, top_k: Array | int = 0, top_p: Array | float = 1.0) -> Array:
    """Logits with -inf outside the top-k, then outside the top-p nucleus (fp32)."""
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    rank_V = jnp.arange(V)
    top_k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    sorted_BV = jnp.where(rank_V < k, sorted_BV, -jnp.inf)
    # Nucleus: token r stays while the mass of the tokens ranked above it is < top_p, so the
    # most likely token always stays and the kept mass first reaches top_p at the last one.
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B = jnp.maximum(jnp.sum((mass_above_BV < top_p) & (rank_V < k), axis=-1), 1)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)


def sample(key: Array, logits_BV: Array, temperature: Array | float = 1.0,
           top_k: Array | int = 0, top_p: Array | float = 1.0) -> Array:
    """One token per row, int32 [B], drawn from the filtered, tempered distribution."""
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), MIN_TEMPERATURE)
    scaled_BV = logits_BV.astype(jnp.float32) / t
    return jax.random.categorical(key, filter_logits(scaled_BV, top_k, top_p),
                                  axis=-1).astype(jnp.int32)


def next_token(key: Array, logits_BV: Array, settings: dict, do_sample: bool) -> Array:
    """Greedy when `do_sample` is False (a static choice), else `sample` with settings
    {'temperature', 'top_k', 'top_p'}."""
    if not do_sample:
        return greedy(logits_BV)
    return sample(key, logits_BV, settings["temperature"], settings["top_k"], settings["top_p"])


def log_probs(logits_BV: Array) -> Array:
    """log softmax in fp32 (beam scores add these up)."""
    return jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
