"""Logits processors that depend on what was generated: pure functions, traced settings.

They follow transformers' definitions and run before the sampling filters (temperature,
top-k, top-p), as transformers orders them; beam search applies them to log-probs.

- End of sequence: a request may stop at any of several ids (Llama-3 instruct ends a turn
  with <|eot_id|>, a later id than the config's eos). They travel as int32 [E], padded
  with -1, which no token equals.
- Repetition penalty (Keskar et al., 2019, as transformers applies it): a token already in
  the sequence (prompt included) has its score divided by the penalty when positive and
  multiplied by it when negative. The "seen" set is a bool [B, V] that each step updates.
- min_new_tokens: every EOS id is masked out until that many new tokens exist.

Shape letters: B rows, V vocabulary, E end-of-sequence ids, T prompt length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
MAX_EOS = 8  # the eos-id buffer size: a fixed shape, so a new list does not recompile


def eos_array(eos_id) -> Array:
    """int32 [MAX_EOS]: the ids, then -1 padding (None -> no EOS at all)."""
    ids = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    if len(ids) > MAX_EOS:
        raise ValueError(f"at most {MAX_EOS} end-of-sequence ids are supported, got {len(ids)}")
    return jnp.asarray(ids + [-1] * (MAX_EOS - len(ids)), jnp.int32)


def is_eos(tok_B: Array, eos_E: Array) -> Array:
    """bool [B]: the token is one of the end-of-sequence ids."""
    return jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)


def eos_vocab_mask(eos_E: Array, vocab: int) -> Array:
    """bool [V]: True at every end-of-sequence id."""
    return jnp.any(jnp.arange(vocab)[:, None] == eos_E[None, :], axis=-1)


def seen_tokens(tokens_BT: Array, mask_BT: Array, vocab: int) -> Array:
    """bool [B, V]: which ids occur among each row's real tokens."""
    rows_B = jnp.arange(tokens_BT.shape[0])[:, None]
    seen = jnp.zeros((tokens_BT.shape[0], vocab), bool)
    return seen.at[rows_B, jnp.where(mask_BT, tokens_BT, vocab)].set(True, mode="drop")


def mark_seen(seen_BV: Array, tok_B: Array) -> Array:
    """The seen set after each row emitted tok_B."""
    return seen_BV.at[jnp.arange(tok_B.shape[0]), tok_B].set(True, mode="drop")


def repetition_penalty(scores_BV: Array, seen_BV: Array, penalty: Array | float) -> Array:
    """transformers' RepetitionPenaltyLogitsProcessor; penalty 1.0 changes nothing."""
    # Per-element factor (1 where unseen): XLA rewrites x / broadcast(p) into x * (1 / p),
    # which is an ulp away from transformers' true division; x / 1 and x * 1 are exact.
    p_BV = jnp.where(seen_BV, jnp.asarray(penalty, scores_BV.dtype), 1).astype(scores_BV.dtype)
    return jnp.where(scores_BV < 0, scores_BV * p_BV, scores_BV / p_BV)


def suppress_eos(scores_BV: Array, eos_E: Array, n_new: Array, min_new: Array) -> Array:
    """transformers' MinNewTokensLengthLogitsProcessor: -inf at every EOS id while fewer
    than min_new tokens have been generated (n_new: tokens before the one being chosen, a
    scalar or one count per row)."""
    early_B1 = jnp.reshape(jnp.asarray(n_new) < min_new, (-1, 1))  # scalar -> [1, 1]
    block_BV = eos_vocab_mask(eos_E, scores_BV.shape[-1])[None, :] & early_B1
    return jnp.where(block_BV, -jnp.inf, scores_BV)


def process(scores_BV: Array, seen_BV: Array, eos_E: Array, n_new: Array,
            rep_penalty: Array, min_new: Array) -> Array:
    """Both history-dependent processors, in transformers' order (repetition, then min-new).

    Each runs under a lax.cond on its traced setting: when it is off (penalty 1, or enough
    tokens already) the [B, V] passes are skipped, which at a 128K vocabulary is a fifth of
    a small model's decode step on a CPU, and the settings still do not recompile."""
    scores_BV = jax.lax.cond(jnp.asarray(rep_penalty) != 1,
                             lambda s: repetition_penalty(s, seen_BV, rep_penalty),
                             lambda s: s, scores_BV)
    return jax.lax.cond(jnp.any(jnp.asarray(n_new) < min_new),
                        lambda s: suppress_eos(s, eos_E, n_new, min_new), lambda s: s,
                        scores_BV)
