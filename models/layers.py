"""Building blocks shared by the transformers: norms, MLPs, embeddings, positions.

Shape letters: B batch, T length, E model width, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import INIT, param_with_axes
from .linear import dense_dot_general

Array = jax.Array


def norm(kind: str, eps: float, dtype: Any, param_dtype: Any, name: str, use_bias: bool = True):
    """LayerNorm (GPT-2, Vaswani) or RMSNorm (Llama); statistics are computed in fp32."""
    scale = param_with_axes(nn.initializers.ones, ("norm",))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, scale_init=scale,
                          name=name)
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, scale_init=scale,
                        use_bias=use_bias,
                        bias_init=param_with_axes(nn.initializers.zeros, ("norm",)), name=name)


def dense(features: int, axes: tuple[str, str], use_bias: bool, dtype, param_dtype, name: str):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    dot_general=dense_dot_general,
                    kernel_init=param_with_axes(INIT, axes),
                    bias_init=param_with_axes(nn.initializers.zeros, (axes[1],)))


class MLP(nn.Module):
    """Position-wise feed-forward: GELU/ReLU (two matrices) or SwiGLU (three)."""

    d_model: int
    d_ff: int
    activation: str = "gelu"  # 'gelu' (tanh approx, GPT-2) | 'relu' (Vaswani) | 'swiglu' (Llama)
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTE: Array) -> Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.activation == "swiglu":
            gate_BTF = dense(self.d_ff, ("embed", "mlp"), name="gate", **kw)(x_BTE)
            up_BTF = dense(self.d_ff, ("embed", "mlp"), name="up", **kw)(x_BTE)
            h_BTF = nn.silu(gate_BTF) * up_BTF
        else:
            h_BTF = dense(self.d_ff, ("embed", "mlp"), name="up", **kw)(x_BTE)
            h_BTF = nn.gelu(h_BTF, approximate=True) if self.activation == "gelu" else nn.relu(h_BTF)
        return dense(self.d_model, ("mlp", "embed"), name="down", **kw)(h_BTF)


def embed(vocab: int, width: int, dtype, param_dtype, name: str, std: float = 0.02):
    return nn.Embed(vocab, width, dtype=dtype, param_dtype=param_dtype, name=name,
                    embedding_init=param_with_axes(nn.initializers.normal(std), ("vocab", "embed")))


def sinusoidal_positions(positions_BT: Array, width: int) -> Array:
    """PE[p, 2i] = sin(p / 10000^(2i/E)), PE[p, 2i+1] = cos(same): Vaswani et al. (2017)."""
    i = jnp.arange(width // 2, dtype=jnp.float32)
    angles_BTI = positions_BT[..., None].astype(jnp.float32) / (10000.0 ** (2 * i / width))
    pe = jnp.stack([jnp.sin(angles_BTI), jnp.cos(angles_BTI)], axis=-1)
    return pe.reshape(*positions_BT.shape, width)


def default_positions(tokens_BT: Array) -> Array:
    B, T = tokens_BT.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def embed_scale(width: int) -> float:
    """The paper multiplies embeddings by sqrt(d_model) before adding positions."""
    return math.sqrt(width)
