"""Attention: the reference formula, the fast path, masks, rotary positions, and the module.

Shape letters used in names below:
  B batch, T query length, S key/value length, H query heads, K key/value heads,
  G query heads per kv head (H = K * G), D head dim, E model width (embed).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cpu_attention
from .cache import write_layer_rows, write_rows
from .linear import project

Array = jax.Array
INIT = nn.initializers.normal(stddev=0.02)


def param_with_axes(init, axes: Sequence[str | None]):
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


# ----------------------------------------------------------------------------- masks


def causal_mask(t: int, s: int | None = None) -> Array:
    """[1, 1, T, S] boolean, True where query i may attend key j (j <= i + S - T)."""
    s = t if s is None else s
    return jnp.tril(jnp.ones((t, s), bool), k=s - t)[None, None]


def padding_mask(valid_BS: Array) -> Array:
    """[B, 1, 1, S] boolean from a [B, S] validity mask (True = real token)."""
    return valid_BS.astype(bool)[:, None, None, :]


def lengths_to_mask(lengths_B: Array, size: int) -> Array:
    """[B, size] boolean, True for the first lengths[b] positions."""
    return jnp.arange(size)[None, :] < lengths_B[:, None]


def segment_mask(seg_q_BT: Array, seg_k_BS: Array) -> Array:
    """[B, 1, T, S] boolean: attend only within the same packed document."""
    return (seg_q_BT[:, None, :, None] == seg_k_BS[:, None, None, :])


def combine_masks(*masks: Array | None) -> Array | None:
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else jnp.logical_and(out, m)
    return out


# ------------------------------------------------------------------ reference + fast path


def scaled_dot_product_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array,
                                 mask: Array | None = None) -> Array:
    """softmax(Q K^T / sqrt(d_k)) V, the formula as written; softmax in fp32.

    Layout follows `jax.nn.dot_product_attention`: q [B, T, H, D], k and v [B, S, K, D]
    with K dividing H (grouped-query attention), boolean mask broadcastable to
    [B, H, T, S] with True meaning "may attend". Returns [B, T, H, D].
    """
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    if H % K:
        raise ValueError(f"kv heads ({K}) must divide query heads ({H})")
    G = H // K
    q_BTKGD = q_BTHD.reshape(B, T, K, G, D)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                              preferred_element_type=jnp.float32) / math.sqrt(D)
    if mask is not None:
        mask_BHTS = jnp.broadcast_to(mask, (B, H, T, scores_BKGTS.shape[-1]))
        mask_BKGTS = mask_BHTS.reshape(B, K, G, T, -1)
        scores_BKGTS = jnp.where(mask_BKGTS, scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKD.dtype)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BSKD)
    return out_BTKGD.reshape(B, T, H, D)


def choose_impl(impl: str, dtype: Any, head_dim: int) -> str:
    """'auto' picks cuDNN's fused kernel where it applies (GPU, 16-bit, D <= 128), fmzoo's
    fused CPU kernel on a one-device CPU run in fp32 (unless FMZOO_CPU_ATTENTION=0, and if
    it could be built), else XLA."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128:
        return "cudnn"
    if (backend == "cpu" and jnp.dtype(dtype) == jnp.float32 and jax.device_count() == 1
            and cpu_attention.auto_enabled()):
        # One device only: under a mesh, XLA's partitioner would gather a custom call's
        # sharded operands onto every device instead of splitting the work.
        return "cpu"
    return "xla"


def dot_product_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array,
                          mask: Array | None = None, *, impl: str = "auto",
                          is_causal: bool = False) -> Array:
    """Dispatches to the reference, to `jax.nn.dot_product_attention` ('xla' or 'cudnn'), or
    to the fused CPU kernel ('cpu'; a call it does not take, such as cached decode with
    fewer queries than keys, goes to XLA)."""
    impl = choose_impl(impl, q_BTHD.dtype, q_BTHD.shape[-1])
    if impl == "reference":
        if is_causal:
            mask = combine_masks(mask, causal_mask(q_BTHD.shape[1], k_BSKD.shape[1]))
        return scaled_dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask)
    if impl == "cpu":
        why = cpu_attention.why_not(q_BTHD, k_BSKD)
        if why is not None:
            raise ValueError(f"attention implementation 'cpu' cannot run here: {why}; "
                             "use 'auto' or 'xla'")
        if cpu_attention.unfit(q_BTHD, k_BSKD, mask, is_causal) is None:
            return cpu_attention.cpu_attention(q_BTHD, k_BSKD, v_BSKD, mask, is_causal=is_causal)
        impl = "xla"
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         "use 'auto', 'reference', 'xla', 'cudnn' or 'cpu'")
    if mask is not None:
        B, T, H, _ = q_BTHD.shape
        mask = jnp.broadcast_to(mask, (B, H, T, k_BSKD.shape[1]))
    return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=mask,
                                        is_causal=is_causal, implementation=impl)


# ------------------------------------------------------------------------ rotary


def rope_inv_freq(head_dim: int, theta: float, scaling: Sequence[float] | None = None) -> Array:
    """Inverse frequencies for rotary embeddings, with Llama-3 style frequency scaling.

    scaling = (factor, low_freq_factor, high_freq_factor, original_max_len), as in
    the `rope_scaling` of a Llama-3 Hugging Face config.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    factor, low, high, orig_len = scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig_len / low, orig_len / high
    smooth = (orig_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    return jnp.where(wavelen > low_wavelen, inv / factor,
                     jnp.where(wavelen < high_wavelen, inv, mid))


def apply_rope(x_BTHD: Array, positions_BT: Array, inv_freq: Array) -> Array:
    """Rotates each (i, i + D/2) pair by position * freq (the Hugging Face half layout)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles_BTF)[:, :, None, :], jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


# ------------------------------------------------------------------------ module


class HeadsDense(nn.Module):
    """`nn.DenseGeneral` whose kernel and bias are created at their true multi-dim shape.

    DenseGeneral initialises a flattened 2-d kernel and reshapes it afterwards, so under
    `nn.logical_axis_rules` + a mesh flax applies the 3-d logical names to a 2-d array and
    fails. Same parameter names and shapes as DenseGeneral: checkpoints are unchanged.
    `n_in` trailing input dims (e.g. heads, head_dim) are contracted with the kernel's first.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    n_in: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_out = len(self.features)
        kernel = self.param("kernel", param_with_axes(INIT, self.kernel_axes),
                            tuple(x.shape[-self.n_in:]) + tuple(self.features), self.param_dtype)
        bias = (self.param("bias", param_with_axes(nn.initializers.zeros, self.kernel_axes[-n_out:]),
                           tuple(self.features), self.param_dtype) if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = project(x, kernel, self.n_in)
        return y if bias is None else y + bias


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query heads, optional RoPE and an explicit KV cache.

    Call forms:
      self-attention:    mha(x)                                  -> out
      cross-attention:   mha(x, kv=memory)                        -> out
      precomputed k/v:   mha(x, kv_proj=(k_BSKD, v_BSKD))           -> out
      with a KV cache:   mha(x, cache=(k_BLKD, v_BLKD), cache_index=idx) -> (out, (k, v))
      stacked cache:     mha(x, cache=(k_BNLKD, v_BNLKD), cache_index=idx, cache_layer=i)
                                                                  -> (out, (k, v) stacked)
    With a cache (one layer's slice of a `KVCache`) the new keys/values are written at
    cache_index[b] and the query attends over every slot; `mask` must then be [B, 1, T, L]
    over cache slots. With `cache_layer` (a layer-scanned model) the cache holds every
    layer and this call writes and reads layer `cache_layer` of it.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    out_features: int
    use_bias: bool = False
    use_rope: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    def setup(self):
        common = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(n, axes):  # [B, T, E] -> [B, T, n, D]
            return HeadsDense((n, self.head_dim), ("embed", axes, "head_dim"), **common)
        self.query = proj(self.n_heads, "heads")
        self.key = proj(self.n_kv_heads, "kv_heads")
        self.value = proj(self.n_kv_heads, "kv_heads")
        # [B, T, H, D] -> [B, T, E]
        self.out = HeadsDense((self.out_features,), ("heads", "head_dim", "embed"), n_in=2,
                              **common)

    def _rope(self, x_BTHD, positions_BT):
        inv = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        return apply_rope(x_BTHD, positions_BT, inv)

    def project_kv(self, x_BSE: Array, positions_BS: Array | None = None):
        """Keys and values [B, S, K, D] (rotated when RoPE is on)."""
        k, v = self.key(x_BSE), self.value(x_BSE)
        if self.use_rope:
            if positions_BS is None:
                positions_BS = jnp.broadcast_to(jnp.arange(x_BSE.shape[1]), x_BSE.shape[:2])
            k = self._rope(k, positions_BS)
        return k, v

    def __call__(self, x_BTE: Array, kv: Array | None = None, *, mask: Array | None = None,
                 positions_BT: Array | None = None, kv_positions_BS: Array | None = None,
                 kv_proj: tuple[Array, Array] | None = None,
                 cache: tuple[Array, Array] | None = None,
                 cache_index: Array | None = None, cache_layer: Array | None = None,
                 is_causal: bool = False):
        B, T, _ = x_BTE.shape
        q_BTHD = self.query(x_BTE)
        if self.use_rope:
            if positions_BT is None:
                positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
            q_BTHD = self._rope(q_BTHD, positions_BT)
        if kv_proj is not None:
            k_BSKD, v_BSKD = kv_proj
        else:
            src = x_BTE if kv is None else kv
            pos = positions_BT if kv is None else kv_positions_BS
            k_BSKD, v_BSKD = self.project_kv(src, pos)
        new_cache = None
        if cache is not None and cache_layer is not None:
            new_cache = tuple(write_layer_rows(c, n, cache_layer, cache_index)
                              for c, n in zip(cache, (k_BSKD, v_BSKD)))
            k_BSKD, v_BSKD = (jax.lax.dynamic_index_in_dim(c, cache_layer, axis=1,
                                                           keepdims=False) for c in new_cache)
            k_BSKD, v_BSKD = k_BSKD.astype(self.dtype), v_BSKD.astype(self.dtype)
        elif cache is not None:
            k_BSKD = write_rows(cache[0], k_BSKD, cache_index)
            v_BSKD = write_rows(cache[1], v_BSKD, cache_index)
            new_cache = (k_BSKD, v_BSKD)
            k_BSKD, v_BSKD = k_BSKD.astype(self.dtype), v_BSKD.astype(self.dtype)
        out_BTHD = dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask, impl=self.impl,
                                         is_causal=is_causal)
        out_BTE = self.out(out_BTHD)
        return out_BTE if cache is None else (out_BTE, new_cache)
