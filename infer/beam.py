"""Beam search inside one lax.while_loop, for decoder-only and seq2seq engines alike.

Each prompt keeps W alive beams (no EOS yet) and a pool of W finished hypotheses. At every
step each alive beam proposes all V next tokens, scored by the beam's summed log-prob plus
the token's: the EOS proposals compete for the finished pool with their length-penalised
score, the W best non-EOS proposals become the new alive beams, and the engine's carry (KV
cache or RNN state) is gathered by the parent beam index. Finished hypotheses score
    sum of log-probs / (number of new tokens, EOS included) ** length_penalty
(Hugging Face's rule over the new tokens). The loop stops at max_new_tokens, or once no
alive beam can still beat the worst finished one of its prompt. Alive beams that reach
max_new_tokens compete with the finished ones under the same score. With W at least
(V - 1) ** (max_new_tokens - 1) nothing is ever pruned, so the search is exact.

Shape letters: B prompts, W beams per prompt, R = B * W rows of the carry, V vocabulary,
N capacity of the token buffers (>= max_new_tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .cache import gather_batch
from .sampling import log_probs

Array = jax.Array
NEG_INF = -jnp.inf


def _penalty(n: Array, alpha: Array) -> Array:
    return jnp.power(n.astype(jnp.float32), alpha)


def _take(x_BW, idx_BK):
    """x[b, idx_BK[b, k], ...] for every prompt b and slot k (a gather along the beam axis)."""
    idx = idx_BK.reshape(idx_BK.shape + (1,) * (x_BW.ndim - 2))
    return jnp.take_along_axis(x_BW, idx, axis=1)


def beam_search(engine, params, carry, logits_RV: Array, *, num_beams: int, n_out: int,
                max_new: Array, eos_id: Array, length_penalty: Array):
    """Best hypothesis per prompt: (tokens int32 [B, N] padded with -1, scores f32 [B], carry).

    `carry` and `logits_RV` come from a prefill over every prompt repeated W times
    (rows b*W .. b*W+W-1 belong to prompt b).
    """
    W = num_beams
    R, V = logits_RV.shape
    B = R // W
    alive_logp_BW = jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, NEG_INF), (B, 1))
    empty_BWN = jnp.full((B, W, n_out), -1, jnp.int32)
    state = dict(i=jnp.int32(0), carry=carry, logits_RV=logits_RV, alive_seq=empty_BWN,
                 alive_logp=alive_logp_BW, fin_seq=empty_BWN,
                 fin_score=jnp.full((B, W), NEG_INF, jnp.float32))
    has_eos = eos_id >= 0
    eos_V = (jnp.arange(V) == eos_id) & has_eos

    def cannot_improve(s) -> Array:
        # A beam's log-prob only falls; its best possible score divides it by the largest
        # penalty among the lengths still reachable (i + 1 .. max_new).
        best_alive_B = s["alive_logp"].max(axis=1)
        reach = jnp.maximum(_penalty(s["i"] + 1, length_penalty),
                            _penalty(max_new, length_penalty))
        worst_fin_B = s["fin_score"].min(axis=1)
        return has_eos & jnp.all(worst_fin_B >= best_alive_B / reach)

    def cond(s):
        return (s["i"] < max_new) & ~cannot_improve(s)

    def body(s):
        i = s["i"]
        lp_BWV = s["alive_logp"][..., None] + log_probs(s["logits_RV"]).reshape(B, W, V)
        # EOS proposals join the finished pool; the pool keeps its W best.
        eos_score_BW = jnp.where(has_eos, lp_BWV[..., jnp.maximum(eos_id, 0)], NEG_INF)
        eos_score_BW = eos_score_BW / _penalty(i + 1, length_penalty)
        eos_seq_BWN = s["alive_seq"].at[:, :, i].set(eos_id)
        pool_score = jnp.concatenate([s["fin_score"], eos_score_BW], axis=1)
        pool_seq = jnp.concatenate([s["fin_seq"], eos_seq_BWN], axis=1)
        fin_score_BW, fin_idx_BW = jax.lax.top_k(pool_score, W)
        fin_seq_BWN = _take(pool_seq, fin_idx_BW)
        # Non-EOS proposals: the W best over all beams' continuations stay alive.
        cont_BWV = jnp.where(eos_V, NEG_INF, lp_BWV)
        alive_logp_BW, flat_BW = jax.lax.top_k(cont_BWV.reshape(B, W * V), W)
        parent_BW, token_BW = flat_BW // V, (flat_BW % V).astype(jnp.int32)
        alive_seq_BWN = _take(s["alive_seq"], parent_BW).at[:, :, i].set(token_BW)
        rows_R = (jnp.arange(B)[:, None] * W + parent_BW).reshape(R)
        # The last iteration's step is not needed; it keeps the loop body uniform.
        logits_RV, carry = engine.step(params, gather_batch(s["carry"], rows_R),
                                       token_BW.reshape(R))
        return dict(i=i + 1, carry=carry, logits_RV=logits_RV, alive_seq=alive_seq_BWN,
                    alive_logp=alive_logp_BW, fin_seq=fin_seq_BWN, fin_score=fin_score_BW)

    s = jax.lax.while_loop(cond, body, state)
    # Alive beams are complete hypotheses only if they ran the full max_new tokens.
    full = s["i"] >= max_new
    alive_score_BW = jnp.where(full, s["alive_logp"] / _penalty(s["i"], length_penalty), NEG_INF)
    score_B2W = jnp.concatenate([s["fin_score"], alive_score_BW], axis=1)
    seq_B2WN = jnp.concatenate([s["fin_seq"], s["alive_seq"]], axis=1)
    best_B = jnp.argmax(score_B2W, axis=1)
    tokens_BN = _take(seq_B2WN, best_B[:, None])[:, 0]
    return tokens_BN, jnp.take_along_axis(score_B2W, best_B[:, None], axis=1)[:, 0], s["carry"]
