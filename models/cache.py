"""The decode state each model family owns, as typed pytrees.

A model makes its own with `model.init_cache(batch, max_len, src_len)` and threads it
through `model.prefill(...)` and `model.decode_step(...)`, which always return
(logits_BV, cache). Code outside models/ only allocates, passes, shards and reorders them
(every leaf has the batch as its leading axis, so beam search reorders rows with one gather).

- `KVCache` (decoder-only LMs): per layer keys/values [B, L, K, D] preallocated for L
  slots, plus each row's length. Row b's tokens occupy slots 0..lengths[b]-1; new tokens
  are written at lengths[b], and a query at position p reads slots 0..p only, so stale
  slots (right padding of a prompt, say) are never read and are overwritten later.
  Grouped-query models keep only their K kv heads. `StackedKVCache` is the same state for a
  model built with `scan_layers` (models/scan.py): one [B, n_layers, L, K, D] array per
  k/v, which the layer scan slices along axis 1, so the batch stays the leading axis.
- `EncDecCache` (the Vaswani encoder-decoder): the decoder's self-attention KVCache, each
  decoder layer's cross-attention keys/values, computed once from the encoder output, and
  the source mask.
- `RNNState` (RNN seq2seq): the cell's carry, plus, for the attention models, the encoder
  states (and their projection, or the input-feeding vector). The recurrence the
  transformer's cache replaces.

Each type names its leaves' logical axes (`logical_axes()`), so the cache is sharded by the
same rules as the parameters: batch over 'data'/'fsdp', kv heads over 'tensor'.

Shape letters: B batch, L cache slots, K kv heads, D head dim, S source length, H heads or
RNN hidden width, T new tokens in one call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

Array = jax.Array


def _map_axes(cache, axes_of):
    """A tree of logical PartitionSpecs shaped like `cache` (None leaves stay None)."""
    return jax.tree.map(lambda x: None if x is None else P(*axes_of(x)), cache)


def constrain(cache):
    """Pins every leaf to its logical sharding while traced under `sharding_context(mesh)`;
    a no-op otherwise (a dimension the mesh does not divide stays whole)."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return cache
    from .sharding import fit_spec
    specs = cache.logical_axes()

    def one(x, spec):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        fitted = fit_spec(x.shape, mesh_spec, mesh.shape)
        names = tuple(n if f is not None else None for n, f in zip(spec, fitted))
        return nn.with_logical_constraint(x, names, rules=rules)
    return jax.tree.map(one, cache, specs, is_leaf=lambda x: x is None)


def _check_size(batch: int, slots: int) -> None:
    if batch < 1 or slots < 1:
        raise ValueError(f"a cache needs batch >= 1 and max_len >= 1, got batch={batch}, "
                         f"max_len={slots}")


@struct.dataclass
class KVCache:
    k: tuple  # per layer [B, L, K, D]
    v: tuple  # per layer [B, L, K, D]
    lengths: Array  # int32 [B]: tokens written so far

    @classmethod
    def init(cls, n_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int,
             dtype: Any) -> "KVCache":
        _check_size(batch, slots)
        shape = (batch, slots, kv_heads, head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(n_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(n_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def slots(self) -> int:
        return self.k[0].shape[1]

    def positions(self, T: int) -> Array:
        """[B, T]: the positions of T tokens appended to each row."""
        return self.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None]

    def attend_mask(self, positions_BT: Array) -> Array:
        """[B, 1, T, L]: a query at position p sees slots 0..p (written ones only)."""
        return jnp.arange(self.slots)[None, None, None, :] <= positions_BT[:, None, :, None]

    def layer(self, i: int) -> tuple[Array, Array]:
        return self.k[i], self.v[i]

    def advance(self, kv_layers, written_B: Array | int) -> "KVCache":
        """The cache after every layer wrote its keys/values and each row grew by written_B
        real tokens (right padding is not counted: it is overwritten later)."""
        ks, vs = zip(*kv_layers)
        return self.replace(k=tuple(ks), v=tuple(vs), lengths=self.lengths + written_B)

    def logical_axes(self) -> "KVCache":
        return _map_axes(self, lambda x: ("batch",) if x.ndim == 1 else
                         ("batch", "cache_len", "kv_heads", "head_dim"))


@struct.dataclass
class StackedKVCache(KVCache):
    """KVCache of a layer-scanned model: k, v are [B, n_layers, L, K, D] arrays, not tuples."""

    @classmethod
    def init(cls, n_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int,
             dtype: Any) -> "StackedKVCache":
        _check_size(batch, slots)
        shape = (batch, n_layers, slots, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[Array, Array]:
        return self.k[:, i], self.v[:, i]

    def advance(self, kv_stacked, written_B: Array | int) -> "StackedKVCache":
        """`kv_stacked`: the (k, v) the layer scan carried out, each [B, n_layers, L, K, D]."""
        k, v = kv_stacked
        return self.replace(k=k, v=v, lengths=self.lengths + written_B)

    def logical_axes(self) -> "StackedKVCache":
        return _map_axes(self, lambda x: ("batch",) if x.ndim == 1 else
                         ("batch", "layers", "cache_len", "kv_heads", "head_dim"))


def overwrite(old: Any, new: Any) -> Any:
    """`new` written into `old`'s buffers (same tree; each new leaf fits at offset 0). The
    result aliases the preallocated, donated state, so a prefill refills it in place
    instead of leaving it unused beside a fresh copy."""
    def put(o, n):
        return jax.lax.dynamic_update_slice(o, n.astype(o.dtype), (0,) * o.ndim)
    return jax.tree.map(put, old, new)


def write_rows(cache_BLKD: Array, new_BTKD: Array, index_B: Array) -> Array:
    """Writes T new rows per sequence at that sequence's own offset index_B[b]."""
    def one(c_LKD, n_TKD, i):
        return jax.lax.dynamic_update_slice(c_LKD, n_TKD.astype(c_LKD.dtype), (i, 0, 0))
    return jax.vmap(one)(cache_BLKD, new_BTKD, index_B)


def write_layer_rows(cache_BNLKD: Array, new_BTKD: Array, layer: Array,
                     index_B: Array) -> Array:
    """`write_rows` into one layer of a stacked [B, N, L, K, D] cache, at a traced layer
    index: only the T new rows are written, so inside the layer scan the stacked buffer is
    updated in place (slicing the layer out and writing the whole slice back made XLA copy
    it every layer and step)."""
    def one(c_NLKD, n_TKD, i):
        return jax.lax.dynamic_update_slice(c_NLKD, n_TKD[None].astype(c_NLKD.dtype),
                                            (layer, i, 0, 0))
    return jax.vmap(one)(cache_BNLKD, new_BTKD, index_B)


@struct.dataclass
class EncDecCache:
    self_attn: KVCache
    cross_k: tuple  # per decoder layer [B, S, H, D]
    cross_v: tuple  # per decoder layer [B, S, H, D]
    src_mask: Array  # bool [B, S], True = real source token

    @classmethod
    def init(cls, n_layers: int, batch: int, slots: int, src_len: int, heads: int,
             head_dim: int, dtype: Any) -> "EncDecCache":
        if src_len < 1:
            raise ValueError(f"an encoder-decoder cache needs src_len >= 1, got {src_len}")
        cross = (batch, src_len, heads, head_dim)
        return cls(self_attn=KVCache.init(n_layers, batch, slots, heads, head_dim, dtype),
                   cross_k=tuple(jnp.zeros(cross, dtype) for _ in range(n_layers)),
                   cross_v=tuple(jnp.zeros(cross, dtype) for _ in range(n_layers)),
                   src_mask=jnp.zeros((batch, src_len), bool))

    def with_source(self, ks, vs, src_mask_BS: Array) -> "EncDecCache":
        """The cache holding a new source's cross keys/values and mask (written in place)."""
        return overwrite(self, self.replace(cross_k=tuple(ks), cross_v=tuple(vs),
                                            src_mask=src_mask_BS.astype(bool)))

    def logical_axes(self) -> "EncDecCache":
        cross = lambda x: ("batch", "length") if x.ndim == 2 else (  # noqa: E731
            "batch", "length", "heads", "head_dim")
        return self.replace(self_attn=self.self_attn.logical_axes(),
                            **{k: _map_axes(getattr(self, k), cross)
                               for k in ("cross_k", "cross_v", "src_mask")})


@struct.dataclass
class RNNState:
    carry: Any  # [B, H], or (c [B, H], h [B, H]) for the LSTM
    feed: Array | None = None  # [B, H] previous attentional vector (luong)
    memory: Array | None = None  # [B, S, H] encoder states (attention models)
    keys: Array | None = None  # [B, S, A] encoder states projected by W_k (bahdanau)
    src_mask: Array | None = None  # bool [B, S] (attention models)

    def logical_axes(self) -> "RNNState":
        return _map_axes(self, lambda x: ("batch", "hidden") if x.ndim == 2 and x.dtype != bool
                         else ("batch", "length") if x.ndim == 2 else
                         ("batch", "length", "hidden"))


def cache_bytes(model, batch: int, max_len: int, src_len: int = 1) -> int:
    """Bytes of the decode state `model.init_cache` would allocate (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len, src_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
