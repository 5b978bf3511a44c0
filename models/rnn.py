"""RNN sequence-to-sequence models: the vanilla encoder-decoder and its attention variants.

`RNNSeq2Seq(config)` with `config.cell` in 'rnn' (tanh), 'gru', 'lstm' and
`config.attention` in None, 'bahdanau', 'luong':

- vanilla (attention None): the decoder starts from the encoder's final state and sees
  nothing else of the source -- the whole sentence squeezed through one vector;
- 'bahdanau': before each step the previous decoder state scores every encoder state
  additively, v^T tanh(W_q s + W_k h_j); the context is fed to the cell with the token and
  to the output layer with the new state;
- 'luong': after each step the new decoder state scores every encoder state by a dot
  product; tanh(W_c [context; state]) is the attentional vector that makes the logits and
  is fed back into the next step's input ("input feeding").

Padded source positions (right padding, src_mask False) change nothing: the encoder's
final state is read at each row's last real token (nn.RNN seq_lengths) and attention gives
padding weight 0.

Inference API (teacher forcing `__call__` is exactly these three calls):

    memory_BSH, final = model.apply(v, src_BS, src_mask_BS, method=model.encode)
    state = model.apply(v, memory_BSH, final, src_mask_BS, method=model.init_decode_state)
    logits_BTV, state = model.apply(v, tgt_BT, state, method=model.decode)

Decoding T tokens at once equals T one-token calls carrying the state. The state is an
`RNNState` (models/cache.py), batch axis first on every leaf (fits a lax.while_loop and
beam gathers): the cell's carry, and for the attention models the encoder states, their
W_k projection (bahdanau) or the previous attentional vector (luong), and the source mask.
Generation uses the interface every zoo model shares: `init_cache`, `prefill` (encoder,
then config.bos_id) and `decode_step` (one cell update).

`decode` also takes tgt_mask_BT (False: that row's state does not advance, for ragged
forced prefixes) and memory_BSH / src_mask_BS (replace the state's copies).

`state_gradient_norms` measures ||d h_T / d x_t|| with the same cells (vanishing gradients);
`open_keep_gates` sets the LSTM forget / GRU update gate bias, which that picture needs.

Shape letters: B batch, S source length, T target length, E embedding width,
H hidden width, X decoder output width (H, or 2H for bahdanau), V target vocabulary.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import param_with_axes
from .cache import RNNState, constrain, overwrite
from .config import RNNConfig
from .layers import dense, embed
from .rnn_attention import AdditiveAttention, dot_attention, key_projection

Array = jax.Array
CELLS = {"rnn": nn.SimpleCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}
KEEP_GATE = {"gru": "iz", "lstm": "hf"}  # the bias that decides how much state a step keeps


def make_cell(kind: str, d_hidden: int, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, name: str | None = None) -> nn.RNNCellBase:
    """A flax cell with its default initialisers, every parameter named for sharding.

    A hidden-to-hidden matrix reads the state on 'hidden_in' and writes on 'hidden': one
    logical name on both axes would map the mesh axis 'tensor' twice, which is invalid.
    """
    if kind not in CELLS:
        raise ValueError(f"unknown cell {kind!r}; use one of {sorted(CELLS)}")
    return CELLS[kind](
        features=d_hidden, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=param_with_axes(nn.initializers.lecun_normal(), ("embed", "hidden")),
        recurrent_kernel_init=param_with_axes(nn.initializers.orthogonal(), ("hidden_in", "hidden")),
        bias_init=param_with_axes(nn.initializers.zeros, ("hidden",)))


def hidden_of(kind: str, carry: Any) -> Array:
    """The cell's output h from its carry (the LSTM's carry is (c, h))."""
    return carry[1] if kind == "lstm" else carry


def zero_carry(kind: str, batch: int, d_hidden: int, dtype: Any) -> Any:
    h = jnp.zeros((batch, d_hidden), dtype)
    return (h, h) if kind == "lstm" else h


def _select(live_B: Array, new: Any, old: Any) -> Any:
    """Per row: the new state where the row is live, the old one elsewhere."""
    def one(n, o):
        return jnp.where(live_B.reshape((-1,) + (1,) * (n.ndim - 1)), n.astype(o.dtype), o)
    return jax.tree.map(one, new, old)


class DecoderStep(nn.Module):
    """One decoder step; scanned over time by `RNNSeq2Seq` (params shared across steps)."""

    config: RNNConfig

    @nn.compact
    def __call__(self, state: dict, x_BE: Array, live_B: Array, static: RNNState):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        carry = state["carry"]
        if c.attention == "bahdanau":
            ctx_BH, _ = AdditiveAttention(c.d_hidden, dt, pdt, name="attention")(
                hidden_of(c.cell, carry), static.keys, static.memory, static.src_mask)
            x_BE = jnp.concatenate([x_BE, ctx_BH.astype(dt)], axis=-1)
        elif c.attention == "luong":
            x_BE = jnp.concatenate([x_BE, state["feed"].astype(dt)], axis=-1)
        new_carry, h_BH = make_cell(c.cell, c.d_hidden, dt, pdt, name="cell")(carry, x_BE)
        new = {"carry": new_carry}
        if c.attention == "bahdanau":
            out_BX = jnp.concatenate([h_BH, ctx_BH.astype(dt)], axis=-1)
        elif c.attention == "luong":
            ctx_BH, _ = dot_attention(h_BH, static.memory, static.src_mask)
            out_BX = jnp.tanh(dense(c.d_hidden, ("hidden_in", "hidden"), False, dt, pdt, "combine")(
                jnp.concatenate([ctx_BH.astype(dt), h_BH], axis=-1)))
            new["feed"] = out_BX
        else:
            out_BX = h_BH
        return _select(live_B, new, state), out_BX


def _check_tokens(name: str, tokens: Array, mask: Array | None = None) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids of shape [batch, length], got "
                         f"{tokens.dtype}{list(tokens.shape)}; add a batch axis with x[None]")
    if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"{name} mask has shape {list(mask.shape)} but the tokens have "
                         f"{list(tokens.shape)}; pass one True/False per token")


class RNNSeq2Seq(nn.Module):
    """Encoder-decoder RNN; see the module docstring for the variants and the state."""

    config: RNNConfig

    def setup(self):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        # std 1 matches nn.Embed's own default and lecun-normal input kernels: unit-scale
        # pre-activations, so the cells start neither linear nor saturated.
        self.src_embed = embed(c.src_vocab_size, c.d_embed, dt, pdt, "src_embed", std=1.0)
        self.tgt_embed = embed(c.tgt_vocab_size, c.d_embed, dt, pdt, "tgt_embed", std=1.0)
        self.encoder = nn.RNN(make_cell(c.cell, c.d_hidden, dt, pdt), return_carry=True)
        if c.attention == "bahdanau":
            self.attn_keys = key_projection(c.d_hidden, dt, pdt, "attn_keys")
        self.decoder = nn.scan(DecoderStep, variable_broadcast="params",
                               split_rngs={"params": False}, in_axes=(1, 1, nn.broadcast),
                               out_axes=1)(c)
        self.out = dense(c.tgt_vocab_size, ("hidden_in", "vocab"), True, dt, pdt, "out")

    def encode(self, src_BS: Array, src_mask_BS: Array | None = None):
        """(memory [B, S, H], final carry) -- the carry at each row's last real token."""
        _check_tokens("src_BS", src_BS, src_mask_BS)
        c = self.config
        B = src_BS.shape[0]
        init = zero_carry(c.cell, B, c.d_hidden, c.compute_dtype)
        x_BSE = self.src_embed(src_BS)
        if src_mask_BS is None:
            final, memory_BSH = self.encoder(x_BSE, initial_carry=init)
            return memory_BSH, final
        lengths_B = jnp.sum(src_mask_BS.astype(jnp.int32), axis=-1)
        final, memory_BSH = self.encoder(x_BSE, initial_carry=init, seq_lengths=lengths_B)
        # nn.RNN would read an empty row's state at index -1; an empty source keeps the init.
        return memory_BSH, _select(lengths_B > 0, final, init)

    def init_decode_state(self, memory_BSH: Array, final: Any,
                          src_mask_BS: Array | None = None) -> RNNState:
        """The decoder's state before its first token (see the module docstring)."""
        c = self.config
        carry = jax.tree.map(lambda x: x.astype(c.compute_dtype), final)
        if c.attention is None:
            return RNNState(carry=carry)
        B, S, _ = memory_BSH.shape
        src_mask_BS = (jnp.ones((B, S), bool) if src_mask_BS is None
                       else src_mask_BS.astype(bool))
        if c.attention == "bahdanau":
            return RNNState(carry=carry, memory=memory_BSH, keys=self.attn_keys(memory_BSH),
                            src_mask=src_mask_BS)
        return RNNState(carry=carry, feed=jnp.zeros((B, c.d_hidden), c.compute_dtype),
                        memory=memory_BSH, src_mask=src_mask_BS)

    def init_cache(self, batch: int, max_len: int = 0, src_len: int = 1,
                   dtype: Any = None) -> RNNState:
        """A zeroed state of the shape `prefill` fills (max_len is unused: an RNN keeps no
        per-token cache, only its carry)."""
        c = self.config
        dt = c.compute_dtype if dtype is None else dtype
        carry = zero_carry(c.cell, batch, c.d_hidden, dt)
        if c.attention is None:
            return RNNState(carry=carry)
        memory = jnp.zeros((batch, src_len, c.d_hidden), dt)
        extra = ({"keys": memory} if c.attention == "bahdanau" else
                 {"feed": jnp.zeros((batch, c.d_hidden), dt)})
        return RNNState(carry=carry, memory=memory, src_mask=jnp.zeros((batch, src_len), bool),
                        **extra)

    def prefill(self, src_BS: Array, src_mask_BS: Array, state: RNNState):
        """(logits [B, V] of the first target token, state): encode, then feed bos_id."""
        memory_BSH, final = self.encode(src_BS, src_mask_BS)
        state = overwrite(state, self.init_decode_state(memory_BSH, final, src_mask_BS))
        return self.decode_step(jnp.full(src_BS.shape[:1], self.config.bos_id, jnp.int32), state)

    def decode_step(self, token_B: Array, state: RNNState):
        """(logits [B, V], state): one cell update."""
        logits_B1V, state = self.decode(token_B[:, None], state)
        return logits_B1V[:, 0], constrain(state)

    def decode(self, tgt_BT: Array, state: RNNState, memory_BSH: Array | None = None,
               src_mask_BS: Array | None = None, tgt_mask_BT: Array | None = None):
        """(logits [B, T, V] fp32, new state) for decoder inputs `tgt_BT`.

        `memory_BSH` / `src_mask_BS`, when given, replace the state's copies. Where
        `tgt_mask_BT` is False the state does not advance (ragged prefixes in one batch).
        """
        _check_tokens("tgt_BT", tgt_BT, tgt_mask_BT)
        if not isinstance(state, RNNState):
            raise ValueError(f"state must be an RNNState (from init_decode_state or init_cache), "
                             f"got {type(state).__name__}")
        c = self.config
        if c.attention is not None and memory_BSH is not None:
            fresh = self.init_decode_state(memory_BSH, state.carry, src_mask_BS)
            state = fresh.replace(feed=state.feed) if state.feed is not None else fresh
        if c.attention is not None and state.memory is None:
            raise ValueError("an attention decoder needs the encoder memory: build the state "
                             "with init_decode_state(memory, final, src_mask) or pass memory_BSH")
        loop = {"carry": state.carry} if state.feed is None else {"carry": state.carry,
                                                                   "feed": state.feed}
        live_BT = (jnp.ones(tgt_BT.shape, bool) if tgt_mask_BT is None
                   else tgt_mask_BT.astype(bool))
        static = state.replace(carry=None, feed=None)
        loop, out_BTX = self.decoder(loop, self.tgt_embed(tgt_BT), live_BT, static)
        return self.out(out_BTX).astype(jnp.float32), state.replace(**loop)

    def __call__(self, src_BS: Array, tgt_BT: Array, src_mask_BS: Array | None = None,
                 tgt_mask_BT: Array | None = None, deterministic: bool = True) -> Array:
        """Teacher-forced logits [B, T, V] (fp32); `tgt_BT` are the decoder inputs.

        `deterministic` is accepted for a common signature with the transformers; the RNN
        models have no dropout.
        """
        _check_tokens("src_BS", src_BS, src_mask_BS)
        _check_tokens("tgt_BT", tgt_BT, tgt_mask_BT)
        if src_BS.shape[0] != tgt_BT.shape[0]:
            raise ValueError(f"source batch {src_BS.shape[0]} != target batch {tgt_BT.shape[0]}")
        memory_BSH, final = self.encode(src_BS, src_mask_BS)
        state = self.init_decode_state(memory_BSH, final, src_mask_BS)
        return self.decode(tgt_BT, state, tgt_mask_BT=tgt_mask_BT)[0]


def open_keep_gates(params: Any, cell_name: str, bias: float = 1.0) -> Any:
    """Params with every cell's keep-gate bias set to `bias` (plain, unboxed params).

    The keep gate is the LSTM's forget gate f and the GRU's update gate z (in flax z weights
    the old state). flax starts both at 0: a step keeps about half of the state, and at
    init a gated cell's d h_T / d x_t decays as fast as a tanh RNN's. A bias of 1 (Gers et
    al., 2000; Jozefowicz et al., 2015; Keras' unit_forget_bias) keeps ~73% per step.
    The tanh RNN has no gate: its params come back unchanged.
    """
    gate = KEEP_GATE.get(cell_name)
    if gate is None:
        return params

    def visit(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: visit(v) for k, v in tree.items()}
        cell = out.get("cell")
        if isinstance(cell, dict) and gate in cell:
            b = cell[gate]["bias"]
            out["cell"] = {**cell, gate: {**cell[gate], "bias": jnp.full_like(b, bias)}}
        return out

    return visit(params)


def state_gradient_norms(cell_name: str, d_hidden: int, inputs_TE: Array, rng: jax.Array,
                         keep_gate_bias: float = 1.0) -> Array:
    """[T]: ||d h_T / d x_t|| (Frobenius) for a fresh cell run over inputs_TE.

    The cell is `make_cell`'s (the model's), initialised from `rng`, with its keep-gate
    bias set by `open_keep_gates` (1.0: the usual forget-gate init; 0.0: flax's default,
    under which the gated cells vanish about as fast as the tanh RNN at init). h_T is the
    output after the last step (for the LSTM its h, not c). Jit/vmap it with the first two
    arguments static.
    """
    rnn = nn.RNN(make_cell(cell_name, d_hidden), return_carry=True)
    params = nn.meta.unbox(rnn.init(rng, inputs_TE[None]))
    params = open_keep_gates(params, cell_name, keep_gate_bias)

    def final_hidden(x_TE):
        carry, _ = rnn.apply(params, x_TE[None])
        return hidden_of(cell_name, carry)[0]

    jac_HTE = jax.jacrev(final_hidden)(inputs_TE)
    return jnp.sqrt(jnp.sum(jnp.square(jac_HTE), axis=(0, 2)))
