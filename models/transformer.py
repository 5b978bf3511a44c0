"""Transformers: decoder-only LMs (GPT-2 and Llama flavours) and the Vaswani encoder-decoder.

One block serves all three; switches pick the norm, MLP, positions, biases and LN placement.
Shape letters: B batch, T target/query length, S source length, L cache slots,
E model width, V vocabulary, K kv heads, D head dim.

KV cache (the inference package makes it): {"lengths": int32[B],
"layers": ({"k": [B, L, K, D], "v": [B, L, K, D]}, ...)}; an encoder-decoder cache adds
"cross": ((k_BSKD, v_BSKD), ...) and "src_mask": bool[B, S].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import MultiHeadAttention, combine_masks, padding_mask, segment_mask
from .config import EncDecConfig, LMConfig
from .sharding import constrain_activations
from .layers import MLP, default_positions, dense, embed, embed_scale, norm, sinusoidal_positions

Array = jax.Array


class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP; each with a residual and a norm."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    activation: str
    norm_kind: str
    norm_eps: float
    use_bias: bool
    pre_ln: bool = True
    cross: bool = False
    use_rope: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    def setup(self):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mk_norm = lambda name: norm(self.norm_kind, self.norm_eps, name=name, **common)  # noqa: E731
        self.attn_norm = mk_norm("attn_norm")
        self.attn = MultiHeadAttention(
            self.n_heads, self.n_kv_heads, self.head_dim, self.d_model, use_bias=self.use_bias,
            use_rope=self.use_rope, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            impl=self.impl, **common)
        if self.cross:
            self.cross_norm = mk_norm("cross_norm")
            self.cross_attn = MultiHeadAttention(
                self.n_heads, self.n_heads, self.head_dim, self.d_model, use_bias=self.use_bias,
                impl=self.impl, **common)
        self.mlp_norm = mk_norm("mlp_norm")
        self.mlp = MLP(self.d_model, self.d_ff, self.activation, self.use_bias, **common)
        self.drop = nn.Dropout(self.dropout)

    def _residual(self, x, norm_fn, fn, deterministic):
        if self.pre_ln:
            return x + self.drop(fn(norm_fn(x)), deterministic=deterministic)
        return norm_fn(x + self.drop(fn(x), deterministic=deterministic))

    # Positional (not keyword-only): under `nn.remat` the Python flags is_causal and
    # deterministic must be static, and jax.checkpoint makes only positional args static.
    def __call__(self, x_BTE, mask=None, positions_BT=None, is_causal=False, cache=None,
                 cache_index=None, cross_kv=None, cross_mask=None, deterministic=True):
        new_cache = None

        def self_attn(h):
            nonlocal new_cache
            out = self.attn(h, mask=mask, positions_BT=positions_BT, cache=cache,
                            cache_index=cache_index, is_causal=is_causal)
            if cache is not None:
                out, new_cache = out
            return out

        x_BTE = self._residual(x_BTE, self.attn_norm, self_attn, deterministic)
        if self.cross:
            cross = lambda h: self.cross_attn(h, kv_proj=cross_kv, mask=cross_mask)  # noqa: E731
            x_BTE = self._residual(x_BTE, self.cross_norm, cross, deterministic)
        x_BTE = self._residual(x_BTE, self.mlp_norm, self.mlp, deterministic)
        return x_BTE, new_cache

    def project_cross(self, memory_BSE):
        return self.cross_attn.project_kv(memory_BSE)


# Block.__call__ argument numbers (self is 0) of the Python values jax.checkpoint must not trace.
_STATIC_ARGNUMS = (4, 9)  # is_causal, deterministic


def block_class(remat: str) -> type[nn.Module]:
    """Block, or Block under `nn.remat` (same parameter names, so checkpoints still load).

    'full' recomputes everything in the block on the backward pass; 'dots' keeps the outputs
    of the weight matmuls (dots without batch dimensions: projections and the MLP, O(B T E))
    and recomputes the rest, notably the attention scores and probabilities, which are
    batched dots of size O(B H T S) and the largest activations at long lengths.
    """
    if remat == "none":
        return Block
    policies = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if remat not in policies:
        raise ValueError(f"remat must be 'none', 'full' or 'dots', got {remat!r}")
    return nn.remat(Block, static_argnums=_STATIC_ARGNUMS, policy=policies[remat])


def cache_mask(positions_BT: Array, slots: int) -> Array:
    """[B, 1, T, L]: a query at position p sees cache slots 0..p (written ones only)."""
    return (jnp.arange(slots)[None, None, None, :] <= positions_BT[:, None, :, None])


def _advance(cache: dict, new_layers, padding_mask_BT, T: int) -> dict:
    """Lengths grow by the real (non-pad) tokens written; pads are overwritten later."""
    written = T if padding_mask_BT is None else padding_mask_BT.sum(-1).astype(jnp.int32)
    return {**cache, "layers": tuple(new_layers), "lengths": cache["lengths"] + written}


def _self_attention_inputs(tokens_BT, positions_BT, padding_mask_BT, segment_ids_BT, cache):
    """Positions, mask and causality flag for a no-cache or a cached call."""
    if cache is not None:
        if positions_BT is None:
            T = tokens_BT.shape[1]
            positions_BT = cache["lengths"][:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        slots = cache["layers"][0]["k"].shape[1]
        return positions_BT, cache_mask(positions_BT, slots), False
    if positions_BT is None:
        positions_BT = default_positions(tokens_BT)
    mask = combine_masks(
        None if padding_mask_BT is None else padding_mask(padding_mask_BT),
        None if segment_ids_BT is None else segment_mask(segment_ids_BT, segment_ids_BT))
    return positions_BT, mask, True


class DecoderLM(nn.Module):
    """GPT-2 / Llama decoder-only LM: tokens int32 [B, T] -> logits float32 [B, T, V]."""

    config: LMConfig

    def setup(self):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        llama = c.flavor == "llama"
        self.embed = embed(c.vocab_size, c.d_model, dt, pdt, "embed")
        if not llama:
            self.pos_embed = embed(c.max_len, c.d_model, dt, pdt, "pos_embed", std=0.01)
        block = block_class(c.remat)
        self.layers = [
            block(c.d_model, c.n_heads, c.n_kv_heads, c.dim_per_head, c.d_ff,
                  activation="swiglu" if llama else "gelu",
                  norm_kind="rmsnorm" if llama else "layernorm", norm_eps=c.norm_eps,
                  use_bias=c.use_bias, pre_ln=True, use_rope=llama, rope_theta=c.rope_theta,
                  rope_scaling=c.rope_scaling, dropout=c.dropout, dtype=dt, param_dtype=pdt,
                  impl=c.attention_impl)
            for _ in range(c.n_layers)]
        self.final_norm = norm("rmsnorm" if llama else "layernorm", c.norm_eps, dt, pdt, "final_norm")
        if not c.tie_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), False, dt, pdt, "lm_head")
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
                 padding_mask_BT: Array | None = None, segment_ids_BT: Array | None = None,
                 cache: dict | None = None, deterministic: bool = True,
                 return_hidden: bool = False):
        """Logits [B, T, V]; with a cache, (logits, new_cache). `padding_mask_BT` True = real."""
        c = self.config
        positions_BT, mask, is_causal = _self_attention_inputs(
            tokens_BT, positions_BT, padding_mask_BT, segment_ids_BT, cache)
        x_BTE = self.embed(tokens_BT)
        if c.flavor != "llama":
            x_BTE = x_BTE + self.pos_embed(positions_BT)
        x_BTE = constrain_activations(self.drop(x_BTE, deterministic=deterministic))
        new_layers = []
        for i, layer in enumerate(self.layers):
            x_BTE, lc = layer(x_BTE, mask, positions_BT, is_causal,
                              None if cache is None else cache["layers"][i],
                              None if cache is None else cache["lengths"],
                              None, None, deterministic)
            x_BTE = constrain_activations(x_BTE)
            new_layers.append(lc)
        h_BTE = self.final_norm(x_BTE)
        logits_BTV = self.logits(h_BTE)
        out = (logits_BTV, h_BTE) if return_hidden else logits_BTV
        if cache is None:
            return out
        return out, _advance(cache, new_layers, padding_mask_BT, tokens_BT.shape[1])

    def logits(self, h_BTE: Array) -> Array:
        if self.config.tie_embeddings:
            return self.embed.attend(h_BTE).astype(jnp.float32)
        return self.lm_head(h_BTE).astype(jnp.float32)


class EncoderDecoder(nn.Module):
    """Vaswani et al. (2017): sinusoidal positions, post-LN (pre-LN optional), ReLU MLP."""

    config: EncDecConfig

    def setup(self):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        blk = dict(d_model=c.d_model, n_heads=c.n_heads, n_kv_heads=c.n_heads,
                   head_dim=c.dim_per_head, d_ff=c.d_ff, activation="relu", norm_kind="layernorm",
                   norm_eps=c.norm_eps, use_bias=True, pre_ln=c.pre_ln, dropout=c.dropout,
                   dtype=dt, param_dtype=pdt, impl=c.attention_impl)
        if c.share_embeddings:
            self.embed = embed(c.src_vocab_size, c.d_model, dt, pdt, "embed", std=c.d_model ** -0.5)
        else:
            self.src_embed = embed(c.src_vocab_size, c.d_model, dt, pdt, "src_embed", std=c.d_model ** -0.5)
            self.tgt_embed = embed(c.tgt_vocab_size, c.d_model, dt, pdt, "tgt_embed", std=c.d_model ** -0.5)
            self.lm_head = dense(c.tgt_vocab_size, ("embed", "vocab"), False, dt, pdt, "lm_head")
        block = block_class(c.remat)
        self.encoder = [block(**blk) for _ in range(c.n_encoder_layers)]
        self.decoder = [block(**blk, cross=True) for _ in range(c.n_decoder_layers)]
        if c.pre_ln:
            self.encoder_norm = norm("layernorm", c.norm_eps, dt, pdt, "encoder_norm")
            self.decoder_norm = norm("layernorm", c.norm_eps, dt, pdt, "decoder_norm")
        self.drop = nn.Dropout(c.dropout)

    def _embed(self, tokens, positions, table, deterministic):
        c = self.config
        x = table(tokens) * embed_scale(c.d_model)
        x = x + sinusoidal_positions(positions, c.d_model).astype(x.dtype)
        return constrain_activations(self.drop(x, deterministic=deterministic))

    def encode(self, src_BS: Array, src_mask_BS: Array | None = None, deterministic: bool = True):
        """Memory [B, S, E]; padded source positions are masked out of every attention."""
        table = self.embed if self.config.share_embeddings else self.src_embed
        x = self._embed(src_BS, default_positions(src_BS), table, deterministic)
        mask = None if src_mask_BS is None else padding_mask(src_mask_BS)
        for layer in self.encoder:
            x, _ = layer(x, mask, None, False, None, None, None, None, deterministic)
            x = constrain_activations(x)
        return self.encoder_norm(x) if self.config.pre_ln else x

    def cross_kv(self, memory_BSE: Array):
        """Every decoder layer's cross-attention keys/values, computed once per source."""
        return tuple(layer.project_cross(memory_BSE) for layer in self.decoder)

    def decode(self, tgt_BT: Array, memory_BSE: Array | None = None,
               src_mask_BS: Array | None = None, tgt_mask_BT: Array | None = None,
               cache: dict | None = None, positions_BT: Array | None = None,
               deterministic: bool = True):
        """Target logits [B, T, V]; with a cache (holding 'cross' and 'src_mask'), (logits, cache)."""
        c = self.config
        positions_BT, mask, is_causal = _self_attention_inputs(
            tgt_BT, positions_BT, tgt_mask_BT, None, cache)
        if cache is not None:
            cross, src_mask_BS = cache["cross"], cache["src_mask"]
        else:
            cross = self.cross_kv(memory_BSE)
        cross_mask = None if src_mask_BS is None else padding_mask(src_mask_BS)
        table = self.embed if c.share_embeddings else self.tgt_embed
        x = self._embed(tgt_BT, positions_BT, table, deterministic)
        new_layers = []
        for i, layer in enumerate(self.decoder):
            x, lc = layer(x, mask, positions_BT, is_causal,
                          None if cache is None else cache["layers"][i],
                          None if cache is None else cache["lengths"],
                          cross[i], cross_mask, deterministic)
            x = constrain_activations(x)
            new_layers.append(lc)
        if c.pre_ln:
            x = self.decoder_norm(x)
        logits = (self.embed.attend(x) if c.share_embeddings else self.lm_head(x)).astype(jnp.float32)
        if cache is None:
            return logits
        return logits, _advance(cache, new_layers, tgt_mask_BT, tgt_BT.shape[1])

    def __call__(self, src_BS: Array, tgt_BT: Array, src_mask_BS: Array | None = None,
                 tgt_mask_BT: Array | None = None, deterministic: bool = True):
        """Teacher-forced logits [B, T, V] for decoder inputs `tgt_BT` given the source."""
        memory = self.encode(src_BS, src_mask_BS, deterministic)
        return self.decode(tgt_BT, memory, src_mask_BS, tgt_mask_BT, deterministic=deterministic)
