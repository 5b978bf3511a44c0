"""One decoder per request shape: prefill and decode, each compiled once, shared by
`generate`, `stream` and the timing stats.

    dec, new = decoder_for(model, shape, mesh)   # cached: same shape -> same compiled code
    state = dec.prefill(params, dec.alloc(), prompt_BT, mask_BT)
    out_BN, state = dec.decode(params, state, key, settings, eos_E, max_new)  # or:
    state = dec.choose(state, key, settings, eos_E); state = dec.step(params, state, ...)

The model owns its cache (`init_cache` / `prefill` / `decode_step`, models/cache.py); this
module never looks inside it. `prefill` reads every prompt in one parallel pass and leaves
the logits of each row's next token in a typed `DecodeState`; `choose` applies the history
processors (repetition penalty, min_new_tokens) and the sampling policy to those logits and
records the token; `decode` is one `lax.while_loop` of feed-then-choose until every row has
emitted an EOS id or max_new tokens, with the state donated so the cache is updated in place.
The last chosen token is never fed back, so prompt + max_new may reach max_len + 1.

Sampling settings, EOS ids, max_new, the repetition penalty and min_new_tokens are traced
values: a new setting or a new prompt length within a shape bucket reuses the compiled code.
Whether the history processors are on at all is static (`Shape.history`), so a request
without them carries no seen-token set and pays nothing for them per step. With a mesh, params and
cache are placed by the logical-axis rules (the cache: batch over 'data'/'fsdp', kv heads
over 'tensor') and every program is traced under those rules.

Shape letters: B rows, T prompt width, N token buffer, V vocabulary, W beams per prompt,
P prompts (B = P * W).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fmzoo.models.config import LMConfig
from fmzoo.models.sharding import logical_shardings, sharding_context

from .beam import beam_search
from .processors import is_eos, mark_seen, process, seen_tokens
from .sampling import MIN_TEMPERATURE, next_token

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Shape:
    """The static shape of a request: everything that changes the compiled programs."""

    rows: int  # cache rows: prompts (bucketed) x beams
    width: int  # prompt (or source) width, bucketed
    slots: int  # cache slots
    n_out: int  # token buffer, >= max_new_tokens
    num_beams: int = 1
    do_sample: bool = False
    early_stopping: bool | str = False
    n_eos: int = 0  # beam search only: how many EOS ids (sets its candidate count)
    history: bool = False  # repetition penalty or min_new_tokens in use (sampling/greedy)
    logprobs: bool = False  # record each chosen token's log-prob (RL rollouts)


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries; every array leaf has the rows as leading axis."""

    cache: Any  # the model's own cache type
    logits_BV: Array | None  # f32: scores of each row's next token (None once chosen)
    seen_BV: Array | None  # bool: ids already in each row (prompt included), kept only
    #                        when a history processor is on
    token_B: Array  # int32: the last chosen token (fed next)
    done_B: Array  # bool: the row has stopped (EOS, or a filler row)
    out_BN: Array  # int32: chosen tokens, -1 after a row stops
    n: Array  # int32 scalar: tokens chosen so far
    logp_BN: Array | None = None  # f32: log-prob of each chosen token (Shape.logprobs), 0
    #                               after a row stops; see `token_logprob`


def token_logprob(logits_BV: Array, tok_B: Array, settings, do_sample: bool) -> Array:
    """log p(tok) under the distribution a policy-gradient loss recomputes from the same
    logits: log_softmax(logits / T), T the sampling temperature (1 for greedy), before the
    top-k / top-p cuts and the history processors (TRL's rollouts take the same). A
    training forward of prompt + completion gives these values again (tests/test_rollout.py)."""
    t = jnp.maximum(settings.temperature, MIN_TEMPERATURE) if do_sample else jnp.float32(1)
    lp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / t, axis=-1)
    return jnp.take_along_axis(lp_BV, tok_B[:, None], axis=-1)[:, 0]


def _apply(model, params, *args, method):
    return model.apply({"params": params}, *args, method=getattr(model, method))


class Decoder:
    """Compiled prefill / choose / step / decode / beam programs for one (model, shape,
    mesh). Build with `decoder_for`, which caches them."""

    def __init__(self, model, shape: Shape, mesh=None):
        self.model, self.shape, self.mesh = model, shape, mesh
        self.seq2seq = not isinstance(model.config, LMConfig)
        prompts = shape.rows // shape.num_beams
        self._cache_args = (prompts, shape.slots, shape.width)
        out_sh = None
        if mesh is not None:
            abstract = jax.eval_shape(lambda: model.init_cache(*self._cache_args))
            out_sh = logical_shardings(abstract.logical_axes(), abstract, mesh)
        self._alloc = jax.jit(lambda: model.init_cache(*self._cache_args), out_shardings=out_sh)
        # With beams the prefill runs on one row per prompt and is then copied to W rows:
        # a state of another shape, so the allocation cannot be reused in place.
        self._prefill = jax.jit(self._prefill_impl,
                                donate_argnums=(1,) if shape.num_beams == 1 else ())
        self._choose = jax.jit(self._choose_impl, donate_argnums=(0,))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))
        self._beam = jax.jit(self._beam_impl, donate_argnums=(1,))

    def _ctx(self):
        return sharding_context(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ---- traced bodies

    def _prefill_impl(self, params, cache, prompt_BT, mask_BT, live_B):
        logits_BV, cache = _apply(self.model, params, prompt_BT, mask_BT, cache, method="prefill")
        B, V = logits_BV.shape
        W = self.shape.num_beams
        seen_BV = None
        if self.shape.history or W > 1:
            if self.seq2seq:  # the decoder's history starts at bos (transformers' input_ids)
                bos_B = jnp.full((B,), self.model.config.bos_id, jnp.int32)
                seen_BV = mark_seen(jnp.zeros((B, V), bool), bos_B)
            else:
                seen_BV = seen_tokens(prompt_BT, mask_BT, V)
        state = DecodeState(cache=cache, logits_BV=logits_BV, seen_BV=seen_BV,
                            token_B=jnp.zeros((B,), jnp.int32), done_B=~live_B,
                            out_BN=jnp.full((B, self.shape.n_out), -1, jnp.int32),
                            n=jnp.int32(0),
                            logp_BN=jnp.zeros((B, self.shape.n_out), jnp.float32)
                            if self.shape.logprobs else None)
        if W > 1:  # each prompt's beams start as copies of its one prefill
            state = jax.tree.map(lambda x: jnp.repeat(x, W, axis=0) if x.ndim else x, state)
        return state

    def _choose_impl(self, state: DecodeState, key, settings, eos_E) -> DecodeState:
        """Picks token n from the pending logits and records it; the logits are dropped
        from the state (None) so the decode loop does not carry a [B, V] buffer."""
        scores_BV, seen_BV = state.logits_BV, state.seen_BV
        if self.shape.history:  # static: a request without penalties pays nothing per step
            scores_BV = process(scores_BV, seen_BV, eos_E, state.n,
                                settings.repetition_penalty, settings.min_new_tokens)
        tok_B = next_token(jax.random.fold_in(key, state.n), scores_BV, settings,
                           self.shape.do_sample)
        out_BN = state.out_BN.at[:, state.n].set(jnp.where(state.done_B, -1, tok_B))
        logp_BN = state.logp_BN
        if self.shape.logprobs:  # static: only rollouts pay for the log-softmax
            lp_B = token_logprob(state.logits_BV, tok_B, settings, self.shape.do_sample)
            logp_BN = logp_BN.at[:, state.n].set(jnp.where(state.done_B, 0.0, lp_B))
        return state.replace(token_B=tok_B, out_BN=out_BN, n=state.n + 1, logits_BV=None,
                             logp_BN=logp_BN,
                             seen_BV=None if seen_BV is None else mark_seen(seen_BV, tok_B),
                             done_B=state.done_B | is_eos(tok_B, eos_E))

    def _feed(self, params, state: DecodeState) -> DecodeState:
        logits_BV, cache = _apply(self.model, params, state.token_B, state.cache,
                                  method="decode_step")
        return state.replace(logits_BV=logits_BV, cache=cache)

    def _step_impl(self, params, state, key, settings, eos_E):
        return self._choose_impl(self._feed(params, state), key, settings, eos_E)

    def _decode_impl(self, params, state, key, settings, eos_E, max_new):
        state = self._choose_impl(state, key, settings, eos_E)
        state = jax.lax.while_loop(
            lambda s: (s.n < max_new) & ~jnp.all(s.done_B),
            lambda s: self._step_impl(params, s, key, settings, eos_E), state)
        # The state is returned so the donated input cache aliases the output (in place).
        return state.out_BN, state

    def _beam_impl(self, params, state, eos_E, max_new, length_penalty, settings):
        def step(cache, tok_B):  # (logits_BV, cache), as beam_search expects
            return _apply(self.model, params, tok_B, cache, method="decode_step")

        tokens_BN, scores_B, cache = beam_search(
            step, state.cache, state.logits_BV, num_beams=self.shape.num_beams,
            n_out=self.shape.n_out, max_new=max_new, eos_E=eos_E, n_eos=self.shape.n_eos,
            length_penalty=length_penalty, early_stopping=self.shape.early_stopping,
            seen_RV=state.seen_BV, rep_penalty=settings.repetition_penalty,
            min_new=settings.min_new_tokens)
        return tokens_BN, scores_B, state.replace(cache=cache)

    # ---- public, each one compiled program

    def alloc(self):
        with self._ctx():
            return self._alloc()

    def prefill(self, params, cache, prompt_BT, mask_BT, live_B) -> DecodeState:
        """live_B False marks filler rows (batch bucketing): they start done."""
        with self._ctx():
            return self._prefill(params, cache, prompt_BT, mask_BT, live_B)

    def choose(self, state, key, settings, eos_E) -> DecodeState:
        with self._ctx(), _logits_not_reused():
            return self._choose(state, key, settings, eos_E)

    def step(self, params, state, key, settings, eos_E) -> DecodeState:
        with self._ctx():
            return self._step(params, state, key, settings, eos_E)

    def decode(self, params, state, key, settings, eos_E, max_new):
        with self._ctx(), _logits_not_reused():
            return self._decode(params, state, key, settings, eos_E, max_new)

    def beam(self, params, state, eos_E, max_new, length_penalty, settings):
        with self._ctx():
            return self._beam(params, state, eos_E, max_new, length_penalty, settings)


@contextlib.contextmanager
def _logits_not_reused():
    """The pending logits are donated with the state but not returned (the loop does not
    carry them): jax's compile-time note about that one unused buffer is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        yield


_DECODERS: dict = {}
MAX_DECODERS = 64


def decoder_for(model, shape: Shape, mesh=None) -> tuple[Decoder, bool]:
    """(the decoder for a model, request shape and mesh, whether it is new): a new one
    compiles on first use, a cached one reuses its programs."""
    key = (model, shape, mesh)
    if key in _DECODERS:
        return _DECODERS[key], False
    if len(_DECODERS) >= MAX_DECODERS:
        _DECODERS.pop(next(iter(_DECODERS)))
    _DECODERS[key] = Decoder(model, shape, mesh)
    return _DECODERS[key], True
