"""The KV cache: an explicit pytree of preallocated keys/values plus per-sequence lengths.

Shape letters: B batch, L cache slots, K kv heads, D head dim.

    {"lengths": int32[B], "layers": ({"k": [B, L, K, D], "v": [B, L, K, D]}, ...)}

Sequence b's tokens occupy slots 0..lengths[b]-1; the model writes new tokens at lengths[b]
and masks every slot past a query's own position, so stale slots are never read.
Grouped-query models cache only their K kv heads (K < H). An encoder-decoder cache gets
"cross" (every decoder layer's cross-attention (k, v)) and "src_mask" at prefill.
Every leaf has the batch as its leading axis, which is what beam search relies on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fmzoo.models.config import ConfigError, EncDecConfig, LMConfig


def init_cache(config: LMConfig | EncDecConfig, batch: int, max_len: int,
               dtype: Any = None) -> dict:
    """A zeroed cache for `batch` sequences of up to `max_len` tokens each.

    `dtype` defaults to the config's compute dtype (bf16 compute -> bf16 cache).
    For an encoder-decoder the self-attention part is allocated here; the prefill adds
    the cross-attention keys/values, whose size depends on the source.
    """
    if not isinstance(config, (LMConfig, EncDecConfig)):
        raise ConfigError(f"init_cache needs a transformer config, got {type(config).__name__}; "
                          "RNN models carry their recurrent state instead of a KV cache")
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be >= 1, got batch={batch}, max_len={max_len}")
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch, max_len, config.n_kv_heads, config.dim_per_head)
    layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                   for _ in range(config.n_layers))
    return {"lengths": jnp.zeros((batch,), jnp.int32), "layers": layers}


def cache_bytes(config: LMConfig | EncDecConfig, batch: int, max_len: int,
                dtype: Any = None) -> int:
    """Bytes of the self-attention keys/values init_cache would allocate."""
    dtype = config.compute_dtype if dtype is None else dtype
    per_layer = 2 * batch * max_len * config.n_kv_heads * config.dim_per_head
    return per_layer * config.n_layers * jnp.dtype(dtype).itemsize


def gather_batch(tree: Any, index_B: jax.Array) -> Any:
    """Row index_B[i] of every leaf becomes row i (beam search reorders its beams so)."""
    return jax.tree.map(lambda x: jnp.take(x, index_B, axis=0), tree)


def repeat_batch(tree: Any, n: int) -> Any:
    """Each row repeated n times in place: [a, b] -> [a, a, b, b] along the leading axis."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)
