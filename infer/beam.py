"""Beam search as transformers runs it, inside one lax.while_loop over a typed state.

Per prompt: W running beams and a pool of W finished hypotheses. Each step:
  1. every running beam's next-token log-probs (log_softmax, then the history processors:
     repetition penalty, min_new_tokens) are added to its score;
  2. the K = max(2, 1 + number of EOS ids) * W best continuations over all beams are taken;
     a continuation "hits" if its token is an EOS id or it reaches max_new tokens;
  3. the W best that do not hit become the running beams (the model state is gathered by
     parent beam);
  4. a hitting continuation becomes a finished hypothesis only if it ranks among the top W
     of the K, scored  sum of log-probs / new_tokens ** length_penalty  (EOS included), and
     enters the pool, which keeps its W best;
  5. the loop stops when no running beam can beat the worst finished one (transformers'
     heuristic, which `early_stopping` shapes), when early_stopping=True and every prompt has
     W finished hypotheses, or when every continuation hits (max_new reached).
`early_stopping`: True stops a prompt as soon as W hypotheses are finished; False (the
default) stops when the best running beam, scored at its current length, cannot beat the
worst finished one; "never" scores it at the longest length it could reach when
length_penalty > 0 (the canonical beam search). Unfinished slots carry -1e9, as in
transformers, so the arithmetic (and the result) is the same.

Shape letters: B prompts, W beams per prompt, R = B * W rows of the model state, V
vocabulary, K candidates per step, N token buffer (>= max_new).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from .processors import is_eos, mark_seen, process

Array = jax.Array
NEG = -1.0e9  # transformers' "not a candidate" score


@struct.dataclass
class BeamState:
    i: Array  # int32: new tokens so far
    carry: Any  # the model's decode state, R rows (beam-major within each prompt)
    logits_RV: Array  # scores of each running beam's next token
    seen_RV: Array  # bool: ids in each beam's history (repetition penalty)
    token_R: Array  # the token each running beam appended last (fed next)
    run_seq: Array  # int32 [B, W, N] running beams' new tokens, -1 after
    run_score: Array  # f32 [B, W] running beams' summed log-probs, best first
    fin_seq: Array  # int32 [B, W, N] finished hypotheses
    fin_score: Array  # f32 [B, W] their length-penalised scores, best first
    fin_done: Array  # bool [B, W] slot holds a real finished hypothesis
    open_B: Array  # bool [B]: a running beam may still beat the finished pool
    all_hit: Array  # bool: every candidate of the last step finished


def _take(x_BW_, idx_BK: Array) -> Array:
    """x[b, idx[b, k], ...]: a gather along the beam axis."""
    idx = idx_BK.reshape(idx_BK.shape + (1,) * (x_BW_.ndim - 2))
    return jnp.take_along_axis(x_BW_, idx, axis=1)


def _penalty(n, alpha: Array) -> Array:
    return jnp.power(jnp.asarray(n, jnp.float32), alpha)


def beam_search(step: Callable, carry: Any, logits_RV: Array, *, num_beams: int, n_out: int,
                max_new: Array, eos_E: Array, n_eos: int, length_penalty: Array,
                early_stopping: bool | str, seen_RV: Array, rep_penalty: Array,
                min_new: Array):
    """(best hypothesis per prompt int32 [B, N] padded with -1, its score f32 [B], carry).

    step(carry, token_R) -> (logits_RV, carry) runs the model one token; `carry` and
    `logits_RV` come from a prefill whose rows b*W .. b*W+W-1 all hold prompt b. n_eos (the
    number of real ids in eos_E), num_beams, n_out and early_stopping are static.
    """
    W = num_beams
    R, V = logits_RV.shape
    B = R // W
    K = max(2, 1 + n_eos) * W
    early_true = early_stopping is True
    never = early_stopping == "never"
    empty = jnp.full((B, W, n_out), -1, jnp.int32)
    state = BeamState(
        i=jnp.int32(0), carry=carry, logits_RV=logits_RV, seen_RV=seen_RV,
        token_R=jnp.zeros((R,), jnp.int32), run_seq=empty,
        run_score=jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, NEG), (B, 1)).astype(jnp.float32),
        fin_seq=empty, fin_score=jnp.full((B, W), NEG, jnp.float32),
        fin_done=jnp.zeros((B, W), bool), open_B=jnp.ones((B,), bool),
        all_hit=jnp.bool_(False))

    def cond(s: BeamState) -> Array:
        full = jnp.all(s.fin_done) & early_true
        return (s.i < max_new) & jnp.any(s.open_B) & ~full & ~s.all_hit

    def body(s: BeamState) -> BeamState:
        i = s.i
        # The first iteration scores the prefill's logits; later ones feed the last tokens
        # (so the final chosen token is never fed, as in greedy decoding).
        logits_RV, carry = jax.lax.cond(i > 0, lambda: step(s.carry, s.token_R),
                                        lambda: (s.logits_RV, s.carry))
        lp_RV = process(jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1), s.seen_RV,
                        eos_E, i, rep_penalty, min_new)
        acc_BWV = lp_RV.reshape(B, W, V) + s.run_score[..., None]
        top_BK, flat_BK = jax.lax.top_k(acc_BWV.reshape(B, W * V), K)
        parent_BK, tok_BK = flat_BK // V, (flat_BK % V).astype(jnp.int32)
        hit_BK = is_eos(tok_BK.reshape(-1), eos_E).reshape(B, K) | (i + 1 >= max_new)
        cand_seq_BKN = _take(s.run_seq, parent_BK).at[:, :, i].set(tok_BK)
        # Running beams: the W best continuations that did not finish.
        run_cand_BK = top_BK + jnp.where(hit_BK, NEG, 0.0)
        run_score_BW, pick_BW = jax.lax.top_k(run_cand_BK, W)
        parent_BW, tok_BW = _take(parent_BK, pick_BW), _take(tok_BK, pick_BW)
        run_seq = _take(cand_seq_BKN, pick_BW)
        # Finished pool: only hits ranked among the top W of this step may enter.
        just_BK = hit_BK & (jnp.arange(K) < W)[None, :]
        score_BK = top_BK / _penalty(i + 1, length_penalty)
        full_B1 = (jnp.all(s.fin_done, axis=-1) & early_true)[:, None]
        score_BK = score_BK + jnp.where(full_B1, NEG, 0.0) + jnp.where(~s.open_B[:, None], NEG, 0.0)
        score_BK = score_BK + jnp.where(~just_BK, NEG, 0.0)
        pool_score = jnp.concatenate([s.fin_score, score_BK], axis=1)
        fin_score, keep_BW = jax.lax.top_k(pool_score, W)
        fin_seq = _take(jnp.concatenate([s.fin_seq, cand_seq_BKN], axis=1), keep_BW)
        fin_done = _take(jnp.concatenate([s.fin_done, just_BK], axis=1), keep_BW)
        # The model state follows each new running beam's parent.
        rows_R = (jnp.arange(B)[:, None] * W + parent_BW).reshape(R)
        reorder = lambda x: jnp.take(x, rows_R, axis=0)  # noqa: E731
        token_R = tok_BW.reshape(R)
        seen_RV = mark_seen(reorder(s.seen_RV), token_R)
        # transformers' stopping heuristic, on the new length i + 1.
        best_len = jnp.where(never & (length_penalty > 0), max_new, i + 1)
        best_B = run_score_BW[:, 0] / _penalty(best_len, length_penalty)
        worst_BW = jnp.where(fin_done, fin_score.min(axis=1, keepdims=True), NEG)
        open_B = s.open_B & jnp.any(best_B[:, None] > worst_BW, axis=1)
        return BeamState(i=i + 1, carry=jax.tree.map(reorder, carry), logits_RV=logits_RV,
                         seen_RV=seen_RV, token_R=token_R, run_seq=run_seq,
                         run_score=run_score_BW, fin_seq=fin_seq, fin_score=fin_score,
                         fin_done=fin_done, open_B=open_B, all_hit=jnp.all(hit_BK))

    s = jax.lax.while_loop(cond, body, state)
    return s.fin_seq[:, 0], s.fin_score[:, 0], s.carry
