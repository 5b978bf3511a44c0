"""Transformers: decoder-only LMs (GPT-2 and Llama flavours) and the Vaswani encoder-decoder.

One block serves all three; switches pick the norm, MLP, positions, biases and LN placement.
Shape letters: B batch, T target/query length, S source length, L cache slots,
E model width, V vocabulary, K kv heads, D head dim.

Decoding (see models/cache.py for the cache types each model owns):

    cache = model.init_cache(batch, max_len, src_len)      # no params needed
    logits_BV, cache = model.apply(v, prompt_BT, mask_BT, cache, method=model.prefill)
    logits_BV, cache = model.apply(v, token_B, cache, method=model.decode_step)

`prefill` reads right-padded prompts (the encoder-decoder: sources) in one parallel pass and
returns only the logits that predict each row's first new token, taken at its last real
position (no [B, T, V] logits); `decode_step` feeds one token per row. `__call__` is the
teacher-forced forward used in training and takes no cache.

With `LMConfig.scan_layers` the decoder's blocks run as one `nn.scan` (params stacked under
`layers`, cache a StackedKVCache); models/scan.py converts params between the layouts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import (MultiHeadAttention, combine_masks, padding_mask, param_with_axes,
                        segment_mask)
from .cache import EncDecCache, KVCache, StackedKVCache, constrain
from .config import EncDecConfig, LMConfig
from .scan import scan_blocks
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

    def _add(self, x, y, norm_fn, deterministic):
        """Residual connection: pre-LN normalised the branch's input, post-LN the sum."""
        x = x + self.drop(y, deterministic=deterministic)
        return x if self.pre_ln else norm_fn(x)

    def _in(self, x, norm_fn):
        return norm_fn(x) if self.pre_ln else x

    # Positional (not keyword-only): under `nn.remat` the Python flags is_causal and
    # deterministic must be static, and jax.checkpoint makes only positional args static.
    def __call__(self, x_BTE, mask=None, positions_BT=None, is_causal=False, kv=None,
                 cache_index=None, cross_kv=None, cross_mask=None, deterministic=True,
                 cache_layer=None):
        """(x_BTE, kv): kv is this layer's (keys, values) cache after the write (None
        without a cache); with `cache_layer`, kv is every layer's stacked cache and this
        block writes and reads its layer of it."""
        h = self._in(x_BTE, self.attn_norm)
        if kv is None:
            a = self.attn(h, mask=mask, positions_BT=positions_BT, is_causal=is_causal)
        else:
            a, kv = self.attn(h, mask=mask, positions_BT=positions_BT, cache=kv,
                              cache_index=cache_index, cache_layer=cache_layer,
                              is_causal=is_causal)
        x_BTE = self._add(x_BTE, a, self.attn_norm, deterministic)
        if self.cross:
            a = self.cross_attn(self._in(x_BTE, self.cross_norm), kv_proj=cross_kv,
                                mask=cross_mask)
            x_BTE = self._add(x_BTE, a, self.cross_norm, deterministic)
        x_BTE = self._add(x_BTE, self.mlp(self._in(x_BTE, self.mlp_norm)), self.mlp_norm,
                          deterministic)
        return x_BTE, kv

    def project_cross(self, memory_BSE):
        return self.cross_attn.project_kv(memory_BSE)


class ScanBlock(Block):
    """One step of the scanned stack (models/scan.py), same params as Block. The carry is
    (x_BTE, the whole stacked cache (k, v) [B, N, L, K, D] or None): this layer writes its
    new rows into layer `layer` of it and reads that layer back, so the cache stays one
    loop-carried buffer updated in place instead of a scan input plus a freshly written
    scan output. The output stream is pinned as `run_layers` pins it between layers."""

    def __call__(self, carry, mask=None, positions_BT=None, is_causal=False, layer=None,
                 cache_index=None, cross_kv=None, cross_mask=None, deterministic=True):
        x_BTE, kv_all = carry
        x_BTE, kv_all = super().__call__(x_BTE, mask, positions_BT, is_causal, kv_all,
                                         cache_index, cross_kv, cross_mask, deterministic,
                                         None if kv_all is None else layer)
        return (constrain_activations(x_BTE), kv_all), None


# Block.__call__ argument numbers (self is 0) of the Python values jax.checkpoint must not trace.
_STATIC_ARGNUMS = (4, 9)  # is_causal, deterministic


def block_class(remat: str, base: type[nn.Module] = Block) -> type[nn.Module]:
    """`base` (Block, or ScanBlock for scan_layers), or it under `nn.remat` (same parameter
    names, so checkpoints still load).

    'full' recomputes everything in the block on the backward pass; 'dots' keeps the outputs
    of the weight matmuls (dots without batch dimensions: projections and the MLP, O(B T E))
    and recomputes the rest, notably the attention scores and probabilities, which are
    batched dots of size O(B H T S) and the largest activations at long lengths.
    """
    if remat == "none":
        return base
    policies = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if remat not in policies:
        raise ValueError(f"remat must be 'none', 'full' or 'dots', got {remat!r}")
    return nn.remat(base, static_argnums=_STATIC_ARGNUMS, policy=policies[remat])


def run_layers(layers, x_BTE, mask, positions_BT, is_causal, cache: KVCache | None,
               cross=None, cross_mask=None, deterministic=True):
    """The block stack, with or without a cache: (x_BTE, each layer's written (k, v))."""
    kv_layers = []
    for i, layer in enumerate(layers):
        x_BTE, kv = layer(x_BTE, mask, positions_BT, is_causal,
                          None if cache is None else cache.layer(i),
                          None if cache is None else cache.lengths,
                          None if cross is None else cross[i], cross_mask, deterministic)
        x_BTE = constrain_activations(x_BTE)
        kv_layers.append(kv)
    return x_BTE, kv_layers


def teacher_forced_inputs(tokens_BT, positions_BT, padding_mask_BT, segment_ids_BT):
    """Positions and mask of a cache-free forward (causality is applied by the kernel)."""
    if positions_BT is None:
        positions_BT = default_positions(tokens_BT)
    mask = combine_masks(
        None if padding_mask_BT is None else padding_mask(padding_mask_BT),
        None if segment_ids_BT is None else segment_mask(segment_ids_BT, segment_ids_BT))
    return positions_BT, mask


# The score head's kernel [E, 1]: split like the other 'embed' inputs; std 1/sqrt(E + 1), the
# reward head init of OpenAI's lm-human-preferences (TRL's PPO examples use it too).
SCORE_HEAD_AXES = ("embed", None)


def score_head_init(d_model: int):
    return nn.initializers.normal(stddev=1.0 / (d_model + 1) ** 0.5)


def last_real(x_BT_, mask_BT: Array) -> Array:
    """x at each row's last real position (right padding): [B, T, ...] -> [B, ...]."""
    last_B = jnp.maximum(mask_BT.sum(-1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(x_BT_, last_B.reshape((-1, 1) + (1,) * (x_BT_.ndim - 2)),
                               axis=1)[:, 0]


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
        if c.scan_layers:  # one scanned stack named `layers` (models/scan.py)
            block = scan_blocks(block_class(c.remat, ScanBlock), c.n_layers)
        else:
            block = block_class(c.remat)
        mk_block = lambda: block(  # noqa: E731
            c.d_model, c.n_heads, c.n_kv_heads, c.dim_per_head, c.d_ff,
            activation="swiglu" if llama else "gelu",
            norm_kind="rmsnorm" if llama else "layernorm", norm_eps=c.norm_eps,
            use_bias=c.use_bias, pre_ln=True, use_rope=llama, rope_theta=c.rope_theta,
            rope_scaling=c.rope_scaling, dropout=c.dropout, dtype=dt, param_dtype=pdt,
            impl=c.attention_impl)
        self.layers = mk_block() if c.scan_layers else [mk_block() for _ in range(c.n_layers)]
        self.final_norm = norm("rmsnorm" if llama else "layernorm", c.norm_eps, dt, pdt, "final_norm")
        if c.head == "score":  # a reward model: no LM head, as in HF's *ForSequenceClassification
            self.score_head = nn.Dense(1, use_bias=False, dtype=dt, param_dtype=pdt,
                                       kernel_init=param_with_axes(
                                           score_head_init(c.d_model), SCORE_HEAD_AXES))
        elif not c.tie_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), False, dt, pdt, "lm_head")
        self.drop = nn.Dropout(c.dropout)

    def init_cache(self, batch: int, max_len: int, src_len: int = 0,
                   dtype: Any = None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (compute dtype); a
        StackedKVCache for a scan_layers model."""
        c = self.config
        cls = StackedKVCache if c.scan_layers else KVCache
        return cls.init(c.n_layers, batch, max_len, c.n_kv_heads, c.dim_per_head,
                        c.compute_dtype if dtype is None else dtype)

    def _trunk(self, tokens_BT, positions_BT, mask, is_causal, cache, deterministic):
        """Final hidden states [B, T, E] and each layer's written (k, v)."""
        x_BTE = self.embed(tokens_BT)
        if self.config.flavor != "llama":
            x_BTE = x_BTE + self.pos_embed(positions_BT)
        x_BTE = constrain_activations(self.drop(x_BTE, deterministic=deterministic))
        if self.config.scan_layers:  # kv_layers: the stacked (k, v), each [B, N, L, K, D]
            kv = None if cache is None else (cache.k, cache.v)
            (x_BTE, kv_layers), _ = self.layers(
                (x_BTE, kv), mask, positions_BT, is_causal,
                jnp.arange(self.config.n_layers), None if cache is None else cache.lengths,
                None, None, deterministic)
        else:
            x_BTE, kv_layers = run_layers(self.layers, x_BTE, mask, positions_BT, is_causal,
                                          cache, deterministic=deterministic)
        return self.final_norm(x_BTE), kv_layers

    def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
                 padding_mask_BT: Array | None = None, segment_ids_BT: Array | None = None,
                 deterministic: bool = True, return_hidden: bool = False):
        """Logits [B, T, V] (with return_hidden, (logits, final hidden [B, T, E])).
        `padding_mask_BT` True = real token; `segment_ids_BT` confines attention to packed
        documents. A score model (config.head 'score') returns its scalar at every position,
        float32 [B, T], as HF's sequence classifiers do before pooling; `score` pools."""
        positions_BT, mask = teacher_forced_inputs(tokens_BT, positions_BT, padding_mask_BT,
                                                   segment_ids_BT)
        h_BTE, _ = self._trunk(tokens_BT, positions_BT, mask, True, None, deterministic)
        out = (self.score_head(h_BTE)[..., 0].astype(jnp.float32)
               if self.config.head == "score" else self.logits(h_BTE))
        return (out, h_BTE) if return_hidden else out

    def score(self, tokens_BT: Array, padding_mask_BT: Array, positions_BT: Array | None = None,
              deterministic: bool = True) -> Array:
        """float32 [B]: the score head at each row's LAST REAL token (the response's EOS),
        whatever the padding side. Positions default to the mask's running count, so the
        amount and side of padding change nothing."""
        if self.config.head != "score":
            raise ValueError("score() needs a reward model (config head='score'); this is a "
                             "language model (head='lm'): train one with `fmzoo reward`")
        mask_BT = padding_mask_BT.astype(jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.maximum(jnp.cumsum(mask_BT, -1) - 1, 0)
        _, mask = teacher_forced_inputs(tokens_BT, positions_BT, mask_BT, None)
        h_BTE, _ = self._trunk(tokens_BT, positions_BT, mask, True, None, deterministic)
        T = tokens_BT.shape[1]
        last_B = jnp.argmax(jnp.where(mask_BT > 0, jnp.arange(T), -1), axis=-1)
        h_BE = jnp.take_along_axis(h_BTE, last_B[:, None, None], axis=1)[:, 0]
        return self.score_head(h_BE)[:, 0].astype(jnp.float32)

    def _cached(self, tokens_BT, cache: KVCache):
        positions_BT = cache.positions(tokens_BT.shape[1])
        return self._trunk(tokens_BT, positions_BT, cache.attend_mask(positions_BT), False,
                           cache, True)

    def prefill(self, tokens_BT: Array, mask_BT: Array, cache: KVCache):
        """(logits [B, V] for each row's next token, cache): right-padded prompts appended to
        the cache in one pass; logits are computed at the last real position only."""
        h_BTE, kv_layers = self._cached(tokens_BT, cache)
        written_B = mask_BT.sum(-1).astype(jnp.int32)
        return self.logits(last_real(h_BTE, mask_BT)), constrain(cache.advance(kv_layers,
                                                                                written_B))

    def decode_step(self, token_B: Array, cache: KVCache):
        """(logits [B, V], cache): one token per row appended."""
        h_B1E, kv_layers = self._cached(token_B[:, None], cache)
        return self.logits(h_B1E[:, 0]), constrain(cache.advance(kv_layers, 1))

    def logits(self, h_BTE: Array) -> Array:
        if self.config.head == "score":
            raise ValueError("this is a reward model (config head='score'): it has no LM head, "
                             "so it scores sequences (fmzoo.train.reward.score) but cannot "
                             "generate; load the language model it was trained from instead")
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
        x, _ = run_layers(self.encoder, x, mask, None, False, None, deterministic=deterministic)
        return self.encoder_norm(x) if self.config.pre_ln else x

    def cross_kv(self, memory_BSE: Array):
        """Every decoder layer's cross-attention keys/values, computed once per source."""
        return tuple(layer.project_cross(memory_BSE) for layer in self.decoder)

    def _decoder(self, tgt_BT, positions_BT, mask, is_causal, cache, cross, src_mask_BS,
                 deterministic):
        c = self.config
        cross_mask = None if src_mask_BS is None else padding_mask(src_mask_BS)
        table = self.embed if c.share_embeddings else self.tgt_embed
        x = self._embed(tgt_BT, positions_BT, table, deterministic)
        x, kv_layers = run_layers(self.decoder, x, mask, positions_BT, is_causal, cache, cross,
                                  cross_mask, deterministic)
        if c.pre_ln:
            x = self.decoder_norm(x)
        out = self.embed.attend(x) if c.share_embeddings else self.lm_head(x)
        return out.astype(jnp.float32), kv_layers

    def decode(self, tgt_BT: Array, memory_BSE: Array, src_mask_BS: Array | None = None,
               tgt_mask_BT: Array | None = None, positions_BT: Array | None = None,
               deterministic: bool = True):
        """Teacher-forced target logits [B, T, V] given the encoder's memory."""
        positions_BT, mask = teacher_forced_inputs(tgt_BT, positions_BT, tgt_mask_BT, None)
        return self._decoder(tgt_BT, positions_BT, mask, True, None, self.cross_kv(memory_BSE),
                             src_mask_BS, deterministic)[0]

    def init_cache(self, batch: int, max_len: int, src_len: int = 1,
                   dtype: Any = None) -> EncDecCache:
        """An empty cache: `max_len` target slots, cross keys/values for `src_len` sources."""
        c = self.config
        return EncDecCache.init(c.n_decoder_layers, batch, max_len, src_len, c.n_heads,
                                c.dim_per_head, c.compute_dtype if dtype is None else dtype)

    def prefill(self, src_BS: Array, src_mask_BS: Array, cache: EncDecCache):
        """(logits [B, V] of the first target token, cache): the encoder runs once, each
        decoder layer's cross keys/values are stored, then config.bos_id is fed."""
        ks, vs = zip(*self.cross_kv(self.encode(src_BS, src_mask_BS)))
        cache = cache.with_source(ks, vs, src_mask_BS)
        return self.decode_step(jnp.full(src_BS.shape[:1], self.config.bos_id, jnp.int32), cache)

    def decode_step(self, token_B: Array, cache: EncDecCache):
        """(logits [B, V], cache): one target token per row appended."""
        kv = cache.self_attn
        positions_B1 = kv.positions(1)
        logits_B1V, kv_layers = self._decoder(
            token_B[:, None], positions_B1, kv.attend_mask(positions_B1), False, kv,
            tuple(zip(cache.cross_k, cache.cross_v)), cache.src_mask, True)
        return logits_B1V[:, 0], constrain(cache.replace(self_attn=kv.advance(kv_layers, 1)))

    def __call__(self, src_BS: Array, tgt_BT: Array, src_mask_BS: Array | None = None,
                 tgt_mask_BT: Array | None = None, deterministic: bool = True):
        """Teacher-forced logits [B, T, V] for decoder inputs `tgt_BT` given the source."""
        memory = self.encode(src_BS, src_mask_BS, deterministic)
        return self.decode(tgt_BT, memory, src_mask_BS, tgt_mask_BT, deterministic=deterministic)
