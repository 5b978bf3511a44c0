"""`generate` and `stream`: validated requests, bucketed shapes, one `Decoder` per shape.

A call validates the request (one clear error before anything is compiled), packs the
prompts into bucketed shapes (powers of two for the batch, the prompt width and the token
buffer), gets the compiled decoder for that shape (infer/decoder.py) and runs its prefill,
then its decode loop (or beam search). The timing stats time those same two programs.

Returned tokens are the new tokens of each prompt, cut after the first EOS id (any of
them); the EOS itself is included, so a caller can tell a stop from running out of
max_new_tokens.

Shape letters: B batch (bucketed), T prompt length (bucketed), N token buffer, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmzoo.models.config import LMConfig

from .decoder import Decoder, Shape, decoder_for
from .processors import MAX_EOS, eos_array
from .sampling import sampling_settings

MIN_BUCKET = 8


class GenerationError(ValueError):
    """A generation request that cannot run; raised before anything is compiled."""


@dataclasses.dataclass
class GenerateStats:
    """Wall-clock timing of one call (a first call of a shape includes compilation)."""

    batch: int  # prompts in the request
    prompt_tokens: int  # real prompt tokens read by the prefill
    new_tokens: int  # tokens returned, over all prompts
    ttft_s: float  # the prefill (prompt read, first token's logits): time to first token
    decode_s: float  # the decode loop
    compiled: bool = False  # the call built a new decoder (its times include compilation)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop (all but each prompt's first) per second."""
        return max(self.new_tokens - self.batch, 0) / max(self.decode_s, 1e-9)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.ttft_s, 1e-9)


# ---------------------------------------------------------------------------- validation


def _check_prompts(config, prompts, seq2seq: bool) -> list[list[int]]:
    if isinstance(prompts, str):
        raise GenerationError("prompts must be token ids, not text: encode it first, e.g. "
                              "[tokenizer.encode(text)]")
    if hasattr(prompts, "__array__") and not isinstance(prompts, np.ndarray):
        prompts = np.asarray(prompts)  # a jax array of ids
    if not isinstance(prompts, (Sequence, np.ndarray)):
        raise GenerationError("prompts must be a list of token-id lists, got "
                              f"{type(prompts).__name__}")
    if len(prompts) == 0:
        raise GenerationError("prompts is empty: pass at least one prompt, e.g. [[1, 2, 3]]")
    if all(isinstance(p, numbers.Integral) for p in prompts):
        raise GenerationError("prompts must be a list of token-id lists; for one prompt wrap "
                              "it: [ids]")
    vocab = getattr(config, "src_vocab_size", config.vocab_size)
    what = "source" if seq2seq else "prompt"
    out = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p) if isinstance(p, (Sequence, np.ndarray)) else None
        if arr is None or isinstance(p, str) or arr.ndim != 1 or (
                arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise GenerationError(f"{what} {i} must be a flat list of integer token ids, "
                                  f"got {p!r:.60}")
        ids = arr.astype(np.int64).tolist()
        if not ids:
            hint = ("pass a non-empty source sequence" if seq2seq else
                    f"start it with a token, e.g. the BOS id {config.bos_id}")
            raise GenerationError(f"{what} {i} is empty; {hint}")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"{what} {i} has token ids outside the vocabulary "
                                  f"[0, {vocab}): {bad[:5]}; use the model's own tokenizer")
        out.append(ids)
    return out


def _uses_rope(config) -> bool:
    return isinstance(config, LMConfig) and config.flavor == "llama"


def _check_lengths(config, longest: int, max_new_tokens, seq2seq: bool) -> None:
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = config.max_len
    if seq2seq:  # the source and the decoder's output each have their own positions
        if longest > limit:
            raise GenerationError(f"a source has {longest} tokens but the model's max_len is "
                                  f"{limit}; shorten the source")
        if max_new_tokens > limit:  # bos takes target position 0
            raise GenerationError(f"max_new_tokens={max_new_tokens} exceeds the model's max_len "
                                  f"{limit}; ask for at most {limit}")
        return
    # The last new token is never fed back: positions 0 .. longest + max_new - 2 are used.
    if longest + max_new_tokens <= limit + 1:
        return
    if _uses_rope(config):
        warnings.warn(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) goes past "
                      f"the model's max_len {limit} (max_position_embeddings): rotary positions "
                      "extend, but the model was not trained at these lengths", stacklevel=4)
        return
    room = limit + 1 - longest
    fix = (f"lower max_new_tokens to {room} or shorten the prompt" if room > 0 else
           f"shorten the prompt to at most {limit + 1 - max_new_tokens} tokens")
    raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                          f"exceeds the model's max_len {limit} + 1 (the last new token is "
                          f"never fed back); {fix}")


def eos_ids(eos_id, vocab: int) -> tuple[int, ...]:
    """The request's end-of-sequence ids as a tuple (None -> none), validated."""
    if eos_id is None:
        return ()
    ids = (eos_id,) if isinstance(eos_id, numbers.Integral) else eos_id
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < vocab
            for i in ids):
        raise GenerationError(f"eos_id must be None, a token id or a list of token ids in "
                              f"[0, {vocab}), got {eos_id!r}")
    if len(ids) > MAX_EOS:
        raise GenerationError(f"at most {MAX_EOS} eos ids are supported, got {len(ids)}")
    return tuple(int(i) for i in ids)


def _check_settings(config, temperature, top_k, top_p, eos_id, num_beams, length_penalty,
                    early_stopping, min_new_tokens, repetition_penalty) -> None:
    real = lambda x: isinstance(x, numbers.Real) and math.isfinite(x)  # noqa: E731
    if not (real(temperature) and temperature >= 0):
        raise GenerationError("temperature must be a finite number >= 0 (0 = greedy), got "
                              f"{temperature!r}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = no top-k cut), got {top_k!r}")
    if not (real(top_p) and 0 < top_p <= 1):
        raise GenerationError(f"top_p must lie in (0, 1] (1 = no nucleus cut), got {top_p!r}")
    eos_ids(eos_id, config.vocab_size)
    if not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise GenerationError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if num_beams > 1 and (temperature > 0 or top_k > 0 or top_p < 1):
        raise GenerationError("beam search is deterministic and cannot be combined with "
                              "sampling; use num_beams=1 to sample, or temperature=0, top_k=0, "
                              "top_p=1 with beams")
    if not real(length_penalty):
        raise GenerationError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise GenerationError("early_stopping must be True, False or 'never' (transformers' "
                              f"meanings), got {early_stopping!r}")
    if not isinstance(min_new_tokens, numbers.Integral) or min_new_tokens < 0:
        raise GenerationError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    if not (real(repetition_penalty) and repetition_penalty > 0):
        raise GenerationError("repetition_penalty must be a finite number > 0 (1.0 = off), got "
                              f"{repetition_penalty!r}")


def validate(config, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
             eos_id=None, num_beams=1, length_penalty=1.0, early_stopping=False,
             min_new_tokens=0, repetition_penalty=1.0, seq2seq=False) -> list[list[int]]:
    """The prompts as lists of ints, or one GenerationError naming the problem and the fix."""
    seqs = _check_prompts(config, prompts, seq2seq)
    _check_lengths(config, max(map(len, seqs)), max_new_tokens, seq2seq)
    _check_settings(config, temperature, top_k, top_p, eos_id, num_beams, length_penalty,
                    early_stopping, min_new_tokens, repetition_penalty)
    return seqs


# ------------------------------------------------------------------------------- shapes


def bucket(n: int, cap: int | None = None) -> int:
    """The power of two >= n (at least MIN_BUCKET), capped at `cap`."""
    b = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return min(b, cap) if cap else b


def _batch_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pack(prompts: list[list[int]], rows: int, width: int):
    """Right-padded int32 [rows, width], its mask, and which rows are real prompts
    (filler rows hold one token 0)."""
    toks = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), bool)
    mask[:, 0] = True
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = p
        mask[b, :len(p)] = True
    live = np.arange(rows) < len(prompts)
    return jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(live)


def plan(model, prompts: list[list[int]], max_new_tokens: int, num_beams: int = 1,
         do_sample: bool = False, early_stopping: bool | str = False, n_eos: int = 0,
         history: bool = False, logprobs: bool = False) -> Shape:
    """The bucketed request shape (rows, prompt width, cache slots, token buffer)."""
    c = model.config
    seq2seq = not isinstance(c, LMConfig)
    longest = max(len(p) for p in prompts)
    rows = _batch_bucket(len(prompts)) * num_beams
    width = bucket(longest, None if _uses_rope(c) else c.max_len)
    n_out = bucket(max_new_tokens)
    # Decoder-only: the prompt's slots then the new ones; seq2seq decoders start from bos.
    # A learned position table caps the cache at max_len (validation keeps real writes
    # below it); rotary models size the cache to the request.
    slots = n_out if seq2seq else width + n_out
    if not _uses_rope(c):
        slots = min(slots, c.max_len)
    return Shape(rows=rows, width=width, slots=slots, n_out=n_out, num_beams=num_beams,
                 do_sample=do_sample, early_stopping=early_stopping if num_beams > 1 else False,
                 n_eos=n_eos if num_beams > 1 else 0, history=history and num_beams == 1,
                 logprobs=logprobs)


# -------------------------------------------------------------------------------- public


def _key(rng) -> jax.Array:
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def _cut(row: np.ndarray, max_new: int, eos: tuple[int, ...]) -> list[int]:
    out = []
    for t in row[:max_new].tolist():
        if t < 0:
            break
        out.append(t)
        if t in eos:
            break
    return out


def _auto_axes(mesh):
    """The mesh with every axis in Auto mode: sharding follows the logical-axis rules and
    XLA's propagation, as in training (an Explicit mesh, jax.make_mesh's default, would
    demand an out_sharding on every gather)."""
    auto = jax.sharding.AxisType.Auto
    if not isinstance(mesh, jax.sharding.Mesh):
        raise GenerationError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; "
                              "make one with fmzoo.train.make_mesh('data=2,tensor=2')")
    if all(t == auto for t in mesh.axis_types):
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(auto,) * len(mesh.axis_names))


@dataclasses.dataclass
class _Request:
    decoder: Decoder
    params: Any
    seqs: list[list[int]]
    eos: tuple[int, ...]
    settings: Any
    new: bool


def _request(model, params, prompts, *, max_new_tokens, temperature, top_k, top_p, eos_id,
             num_beams, length_penalty, early_stopping, min_new_tokens, repetition_penalty,
             mesh, logprobs=False) -> _Request:
    if not hasattr(model, "init_cache") or not hasattr(getattr(model, "config", None), "max_len"):
        raise GenerationError(f"cannot generate with {type(model).__name__}: expected a zoo "
                              "model built by fmzoo.models.build (DecoderLM, EncoderDecoder or "
                              "RNNSeq2Seq)")
    seq2seq = not isinstance(model.config, LMConfig)
    seqs = validate(model.config, prompts, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                    num_beams=num_beams, length_penalty=length_penalty,
                    early_stopping=early_stopping, min_new_tokens=min_new_tokens,
                    repetition_penalty=repetition_penalty, seq2seq=seq2seq)
    if logprobs and num_beams > 1:
        raise GenerationError("return_logprobs gives the log-prob of each sampled or greedy "
                              "token; beam search returns sequence scores instead: use "
                              "num_beams=1")
    eos = eos_ids(eos_id, model.config.vocab_size)
    shape = plan(model, seqs, max_new_tokens, num_beams, temperature > 0, early_stopping,
                 len(eos), history=repetition_penalty != 1 or min_new_tokens > 0,
                 logprobs=logprobs)
    if mesh is not None:
        from fmzoo.models.registry import place_params
        mesh = _auto_axes(mesh)
        params = place_params(params, model.config, mesh)
    settings = sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty,
                                 min_new_tokens=min_new_tokens)
    decoder, new = decoder_for(model, shape, mesh)
    return _Request(decoder, params, seqs, eos, settings, new)


def generate(model, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | Sequence[int] | None = None,
             rng: Any = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, min_new_tokens: int = 0,
             repetition_penalty: float = 1.0, mesh: Any = None, return_stats: bool = False,
             return_logprobs: bool = False):
    """New tokens for each prompt: a list of token-id lists, each cut after its first EOS
    (the EOS included). With return_logprobs=True, (tokens, logprobs): each new token's
    log-prob under log_softmax(logits / temperature) (temperature 1 when greedy), the
    distribution a policy-gradient step recomputes (decoder.token_logprob). With
    return_stats=True, GenerateStats comes last.

    model, params: a zoo model and its params (e.g. from fmzoo.load). prompts: token-id
    lists of any lengths; for seq2seq models the source sequences (the decoder starts from
    config.bos_id). temperature 0 is greedy; top_k 0 and top_p 1 switch those cuts off.
    eos_id: None, an id, or a list of ids (any of them ends a row). min_new_tokens and
    repetition_penalty follow transformers. rng: a PRNG key or an int seed (None = seed 0).
    num_beams > 1 runs transformers' beam search, scored by log-prob / new_tokens **
    length_penalty, stopping as `early_stopping` (True, False or 'never') says; it cannot be
    combined with sampling. mesh: a jax Mesh; params and cache are sharded by the
    logical-axis rules and the result equals one device's.
    """
    req = _request(model, params, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                   num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, min_new_tokens=min_new_tokens,
                   repetition_penalty=repetition_penalty, mesh=mesh,
                   logprobs=return_logprobs)
    dec, W = req.decoder, num_beams
    toks, mask, live = _pack(req.seqs, dec.shape.rows // W, dec.shape.width)
    eos_E, max_new = eos_array(req.eos), jnp.int32(max_new_tokens)
    t0 = time.perf_counter()
    state = dec.prefill(req.params, dec.alloc(), toks, mask, live)
    if return_stats:
        jax.block_until_ready(state.logits_BV)
    t1 = time.perf_counter()
    if W > 1:
        out_BN, _, state = dec.beam(req.params, state, eos_E, max_new,
                                    jnp.float32(length_penalty), req.settings)
    else:
        out_BN, state = dec.decode(req.params, state, _key(rng), req.settings, eos_E, max_new)
    out = np.asarray(out_BN)
    t2 = time.perf_counter()
    logp = np.asarray(state.logp_BN) if return_logprobs else None
    del state
    result = [_cut(out[b], max_new_tokens, req.eos) for b in range(len(req.seqs))]
    if return_logprobs:
        result = result, [logp[b, :len(r)].tolist() for b, r in enumerate(result)]
    if not return_stats:
        return result
    tokens = result[0] if return_logprobs else result
    stats = GenerateStats(batch=len(req.seqs), prompt_tokens=sum(map(len, req.seqs)),
                          new_tokens=sum(map(len, tokens)), ttft_s=t1 - t0,
                          decode_s=t2 - t1, compiled=req.new)
    return (*result, stats) if return_logprobs else (result, stats)


def stream(model, params, prompt: Sequence[int], *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int | Sequence[int] | None = None, min_new_tokens: int = 0,
           repetition_penalty: float = 1.0, rng: Any = None, mesh: Any = None,
           stats: GenerateStats | None = None) -> Iterator[int]:
    """Yields one prompt's new tokens as they are produced: the same compiled prefill and
    step as `generate`, so the same tokens for the same settings and rng. Stops after an
    EOS id (yielded) or max_new_tokens. A GenerateStats passed as `stats` is filled in when
    the stream ends; its decode time includes the caller's time between tokens.
    """
    req = _request(model, params, [prompt], max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                   num_beams=1, length_penalty=1.0, early_stopping=False,
                   min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                   mesh=mesh)
    dec, key, eos_E = req.decoder, _key(rng), eos_array(req.eos)
    toks, mask, live = _pack(req.seqs, dec.shape.rows, dec.shape.width)
    t0 = time.perf_counter()
    state = dec.choose(dec.prefill(req.params, dec.alloc(), toks, mask, live), key,
                       req.settings, eos_E)
    tok, n = int(np.asarray(state.token_B)[0]), 1
    t1 = time.perf_counter()
    yield tok
    while tok not in req.eos and n < max_new_tokens:
        state = dec.step(req.params, state, key, req.settings, eos_E)
        tok, n = int(np.asarray(state.token_B)[0]), n + 1
        yield tok
    if stats is not None:
        stats.__dict__.update(batch=1, prompt_tokens=len(req.seqs[0]), new_tokens=n,
                              ttft_s=t1 - t0, decode_s=time.perf_counter() - t1,
                              compiled=req.new)
