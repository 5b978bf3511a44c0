"""Attention for the RNN decoder: additive (Bahdanau et al., 2015) and dot (Luong et al., 2015).

Both score one decoder state against every encoder state, mask the padded source
positions, and return a context vector, the softmax-weighted sum of the encoder states.

Shape letters: B batch, S source length, H hidden width (encoder and decoder states),
A attention width of the additive score.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import INIT, param_with_axes
from .layers import dense

Array = jax.Array


def masked_softmax(scores_BS: Array, mask_BS: Array | None) -> Array:
    """Softmax over source positions in fp32; positions where mask is False get weight 0."""
    scores_BS = scores_BS.astype(jnp.float32)
    if mask_BS is not None:
        scores_BS = jnp.where(mask_BS, scores_BS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BS, axis=-1)


def context(weights_BS: Array, memory_BSH: Array) -> Array:
    """Sum_j a_j h_j, in the memory's dtype."""
    return jnp.einsum("bs,bsh->bh", weights_BS.astype(memory_BSH.dtype), memory_BSH)


def additive_scores(query_BA: Array, keys_BSA: Array, v_A: Array) -> Array:
    """e_j = v^T tanh(W_q s + W_k h_j), given the projected query W_q s and keys W_k h_j."""
    return jnp.einsum("bsa,a->bs", jnp.tanh(query_BA[:, None, :] + keys_BSA), v_A,
                      preferred_element_type=jnp.float32)


def dot_scores(query_BH: Array, memory_BSH: Array) -> Array:
    """e_j = s . h_j (Luong's 'dot' score: no parameters, no scaling)."""
    return jnp.einsum("bh,bsh->bs", query_BH, memory_BSH, preferred_element_type=jnp.float32)


def dot_attention(query_BH: Array, memory_BSH: Array, mask_BS: Array | None = None):
    """(context [B, H], weights [B, S]) under the dot score."""
    weights_BS = masked_softmax(dot_scores(query_BH, memory_BSH), mask_BS)
    return context(weights_BS, memory_BSH), weights_BS


def key_projection(d_attn: int, dtype: Any, param_dtype: Any, name: str) -> nn.Dense:
    """W_k of the additive score; applied once per source, outside the decoding loop."""
    return dense(d_attn, ("hidden_in", "hidden"), False, dtype, param_dtype, name)


class AdditiveAttention(nn.Module):
    """Bahdanau's score v^T tanh(W_q s + W_k h_j); takes keys already projected by W_k."""

    d_attn: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query_BH: Array, keys_BSA: Array, memory_BSH: Array,
                 mask_BS: Array | None = None):
        """(context [B, H], weights [B, S])."""
        query_BA = dense(self.d_attn, ("hidden_in", "hidden"), False, self.dtype,
                         self.param_dtype, "query")(query_BH)
        v_A = self.param("v", param_with_axes(INIT, ("hidden",)), (self.d_attn,),
                         self.param_dtype).astype(self.dtype)
        weights_BS = masked_softmax(additive_scores(query_BA, keys_BSA.astype(self.dtype), v_A),
                                    mask_BS)
        return context(weights_BS, memory_BSH), weights_BS
