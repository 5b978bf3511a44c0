"""`generate`: validated requests, bucketed shapes, prefill + one jitted decode loop.

A call runs ONE compiled program: the prefill (all prompts in one parallel pass, first
token chosen) followed by the decode loop (one `lax.while_loop` that feeds one token per
sequence per step until every sequence has emitted EOS or max_new_tokens), with the
preallocated cache donated so the loop updates it in place. With return_stats=True the
same two parts run as two programs instead, so that time to first token and decode speed
can be measured separately. Shapes are bucketed to powers of two (batch,
prompt length, token buffer) and the sampling settings, max_new_tokens and eos_id are
traced values, so a new prompt length or setting within a bucket reuses the compiled code.

Returned tokens are the new tokens of each prompt, cut after the first EOS; the EOS itself
is included, so a caller can tell a stop from running out of max_new_tokens.

Shape letters: B batch (bucketed), T prompt length (bucketed), N token buffer, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .beam import beam_search
from .cache import repeat_batch
from .engine import Engine, make_engine, source_vocab
from .sampling import next_token

MIN_BUCKET = 8


class GenerationError(ValueError):
    """A generation request that cannot run; raised before anything is compiled."""


@dataclasses.dataclass
class GenerateStats:
    """Wall-clock timing of one call (compilation included when `compiled` is True)."""

    batch: int  # prompts in the request
    prompt_tokens: int  # real prompt tokens read by the prefill
    new_tokens: int  # tokens returned, over all prompts
    ttft_s: float  # prefill + first token: time to first token
    decode_s: float  # the decode loop
    compiled: bool  # whether this call compiled a new shape bucket

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
    vocab, what = source_vocab(config), "source" if seq2seq else "prompt"
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


def _check_lengths(config, longest: int, max_new_tokens, seq2seq: bool) -> None:
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    limit = config.max_len
    if seq2seq:  # the source and the decoder's output each have their own positions
        if longest > limit:
            raise GenerationError(f"a source has {longest} tokens but the model's max_len is "
                                  f"{limit}; shorten the source")
        if max_new_tokens > limit:
            raise GenerationError(f"max_new_tokens={max_new_tokens} exceeds the model's max_len "
                                  f"{limit}; ask for at most {limit}")
    elif longest + max_new_tokens > limit:
        room = limit - longest
        fix = (f"lower max_new_tokens to {room} or shorten the prompt" if room > 0 else
               f"shorten the prompt to at most {limit - max_new_tokens} tokens")
        raise GenerationError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                              f"exceeds the model's max_len {limit}; {fix}")


def _check_settings(config, temperature, top_k, top_p, eos_id, num_beams,
                    length_penalty) -> None:
    real = lambda x: isinstance(x, numbers.Real) and math.isfinite(x)  # noqa: E731
    if not (real(temperature) and temperature >= 0):
        raise GenerationError("temperature must be a finite number >= 0 (0 = greedy), got "
                              f"{temperature!r}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 = no top-k cut), got {top_k!r}")
    if not (real(top_p) and 0 < top_p <= 1):
        raise GenerationError(f"top_p must lie in (0, 1] (1 = no nucleus cut), got {top_p!r}")
    V = config.vocab_size
    if eos_id is not None and not (isinstance(eos_id, numbers.Integral) and 0 <= eos_id < V):
        raise GenerationError(f"eos_id must be None or a token id in [0, {V}), got {eos_id!r}")
    if not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise GenerationError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if num_beams > 1 and (temperature > 0 or top_k > 0 or top_p < 1):
        raise GenerationError("beam search is deterministic and cannot be combined with "
                              "sampling; use num_beams=1 to sample, or temperature=0, top_k=0, "
                              "top_p=1 with beams")
    if not real(length_penalty):
        raise GenerationError(f"length_penalty must be a finite number, got {length_penalty!r}")


def validate(config, prompts, *, max_new_tokens, temperature, top_k, top_p, eos_id,
             num_beams, length_penalty=1.0, seq2seq=False) -> list[list[int]]:
    """The prompts as lists of ints, or one GenerationError naming the problem and the fix."""
    seqs = _check_prompts(config, prompts, seq2seq)
    _check_lengths(config, max(map(len, seqs)), max_new_tokens, seq2seq)
    _check_settings(config, temperature, top_k, top_p, eos_id, num_beams, length_penalty)
    return seqs


# ------------------------------------------------------------------------------- shapes


def bucket(n: int, cap: int | None = None) -> int:
    """The power of two >= n (at least MIN_BUCKET), capped at `cap`."""
    b = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return min(b, cap) if cap else b


def _batch_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pack(prompts: list[list[int]], rows: int, width: int):
    """Right-padded int32 [rows, width] and its mask; filler rows hold one token 0."""
    toks = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), bool)
    mask[:, 0] = True
    for b, p in enumerate(prompts):
        toks[b, :len(p)] = p
        mask[b, :len(p)] = True
    return toks, mask


def plan(engine: Engine, prompts: list[list[int]], max_new_tokens: int, num_beams: int = 1):
    """Bucketed (rows, prompt width, token buffer, cache slots) for a request."""
    c = engine.config
    rows = _batch_bucket(len(prompts)) * num_beams
    width = bucket(max(len(p) for p in prompts), c.max_len)
    n_out = bucket(max_new_tokens)
    # Decoder-only: prompt slots then new ones; seq2seq decoders start from BOS alone.
    # Capping at max_len is safe: validation keeps every real write below it.
    slots = min(n_out if engine.seq2seq else width + n_out, c.max_len)
    return rows, width, n_out, slots


# ------------------------------------------------------------------------ compiled parts


@functools.partial(jax.jit, static_argnames=("engine", "do_sample"), donate_argnames=("carry",))
def _prefill(engine, params, carry, prompt_BT, mask_BT, key, settings, *, do_sample):
    logits_BV, carry = engine.prefill(params, carry, prompt_BT, mask_BT)
    return next_token(key, logits_BV, settings, do_sample), logits_BV, carry


@functools.partial(jax.jit, static_argnames=("engine", "do_sample", "num_beams"),
                   donate_argnames=("carry",))
def _prefill_rows(engine, params, carry, prompt_BT, mask_BT, key, settings, *, do_sample,
                  num_beams):
    """Prefill; with beams (rows = prompts x beams, each prompt's beams adjacent) it runs on
    one row per prompt and copies the result to the prompt's other beams."""
    if num_beams == 1:
        return _prefill(engine, params, carry, prompt_BT, mask_BT, key, settings,
                        do_sample=do_sample)
    first = lambda x: x[::num_beams]  # noqa: E731
    tok_P, logits_PV, carry_P = _prefill(engine, params, jax.tree.map(first, carry),
                                         first(prompt_BT), first(mask_BT), key, settings,
                                         do_sample=do_sample)
    return (jnp.repeat(tok_P, num_beams, 0), jnp.repeat(logits_PV, num_beams, 0),
            repeat_batch(carry_P, num_beams))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _alloc(engine, rows, slots, width):
    return engine.alloc(rows, slots, width)  # one dispatch instead of one per buffer


def _step_key(key, i):
    return jax.random.fold_in(key, i)


@functools.partial(jax.jit, static_argnames=("engine", "n_out", "do_sample"),
                   donate_argnames=("carry",))
def _decode_loop(engine, params, carry, first_B, live_B, key, settings, max_new, eos_id, *,
                 n_out, do_sample):
    """Tokens int32 [B, N] (-1 after a row stops) and the final carry."""
    B = first_B.shape[0]
    out_BN = jnp.full((B, n_out), -1, jnp.int32).at[:, 0].set(first_B)
    done_B = ~live_B | (first_B == eos_id)

    def cond(s):
        i, _, _, _, done_B = s
        return (i < max_new) & ~jnp.all(done_B)

    def body(s):
        i, carry, tok_B, out_BN, done_B = s
        logits_BV, carry = engine.step(params, carry, tok_B)
        tok_B = next_token(_step_key(key, i), logits_BV, settings, do_sample)
        out_BN = out_BN.at[:, i].set(jnp.where(done_B, -1, tok_B))
        return i + 1, carry, tok_B, out_BN, done_B | (tok_B == eos_id)

    _, carry, _, out_BN, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), carry, first_B,
                                                              out_BN, done_B))
    return out_BN, carry


@functools.partial(jax.jit, static_argnames=("engine", "num_beams", "n_out"),
                   donate_argnames=("carry",))
def _beam_loop(engine, params, carry, logits_RV, max_new, eos_id, length_penalty, *,
               num_beams, n_out):
    return beam_search(engine, params, carry, logits_RV, num_beams=num_beams, n_out=n_out,
                       max_new=max_new, eos_id=eos_id, length_penalty=length_penalty)


@functools.partial(jax.jit, static_argnames=("engine", "n_out", "do_sample", "num_beams"),
                   donate_argnames=("carry",))
def _generate_fused(engine, params, carry, prompt_BT, mask_BT, live_B, key, settings, max_new,
                    eos_id, length_penalty, *, n_out, do_sample, num_beams):
    """Prefill and the whole decode loop as ONE program (the default, stats-free path).

    The final cache is returned (and dropped by the caller) so that the donated input cache
    aliases it: XLA then updates the cache in place instead of allocating a second one."""
    first_B, logits_BV, carry = _prefill_rows(engine, params, carry, prompt_BT, mask_BT,
                                              _step_key(key, 0), settings, do_sample=do_sample,
                                              num_beams=num_beams)
    if num_beams > 1:
        out_BN, _, carry = _beam_loop(engine, params, carry, logits_BV, max_new, eos_id,
                                      length_penalty, num_beams=num_beams, n_out=n_out)
        return out_BN, carry
    return _decode_loop(engine, params, carry, first_B, live_B, key, settings, max_new, eos_id,
                        n_out=n_out, do_sample=do_sample)


def compiled_count() -> int:
    """How many shape buckets the compiled programs hold (tests watch this for recompiles)."""
    fns = (_alloc, _prefill, _prefill_rows, _decode_loop, _beam_loop, _step, _generate_fused)
    return sum(getattr(f, "_cache_size", lambda: 0)() for f in fns)  # private jax API


# -------------------------------------------------------------------------------- public


def _key(rng) -> jax.Array:
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def _settings(temperature, top_k, top_p) -> dict:
    return {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k),
            "top_p": jnp.float32(top_p)}


def _cut(row: np.ndarray, max_new: int, eos_id: int | None) -> list[int]:
    out = []
    for t in row[:max_new].tolist():
        if t < 0:
            break
        out.append(t)
        if t == eos_id:
            break
    return out


def generate(model, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, rng: Any = None,
             num_beams: int = 1, length_penalty: float = 1.0, return_stats: bool = False):
    """New tokens for each prompt: a list of token-id lists, each cut after its first EOS
    (the EOS included). With return_stats=True, (tokens, GenerateStats).

    model, params: a zoo model and its params (e.g. from fmzoo.load). prompts: token-id
    lists of any lengths; for seq2seq models the source sequences (the decoder starts from
    config.bos_id). temperature 0 is greedy; top_k 0 and top_p 1 switch those cuts off.
    rng: a PRNG key or an int seed (None = seed 0). num_beams > 1 runs beam search scored
    by log-prob / new_tokens ** length_penalty; it cannot be combined with sampling.
    """
    engine = make_engine(model)
    seqs = validate(engine.config, prompts, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                    num_beams=num_beams, length_penalty=length_penalty,
                    seq2seq=engine.seq2seq)
    rows, width, n_out, slots = plan(engine, seqs, max_new_tokens, num_beams)
    toks, mask = _pack(seqs, rows // num_beams, width)
    live = np.zeros(rows // num_beams, bool)
    live[:len(seqs)] = True
    if num_beams > 1:  # prompts x beams rows; the prefill runs once per prompt (_prefill_rows)
        toks, mask = np.repeat(toks, num_beams, 0), np.repeat(mask, num_beams, 0)
    key = _key(rng)
    do_sample = temperature > 0
    settings = _settings(temperature, top_k, top_p)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    before = compiled_count()

    t0 = time.perf_counter()
    carry = _alloc(engine, rows, slots, width)
    if not return_stats:
        out_BN, _ = _generate_fused(
            engine, params, carry, jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(live), key,
            settings, jnp.int32(max_new_tokens), eos, jnp.float32(length_penalty), n_out=n_out,
            do_sample=do_sample, num_beams=num_beams)
        out = np.asarray(out_BN)
        return [_cut(out[b], max_new_tokens, eos_id) for b in range(len(seqs))]

    # with stats, prefill and decode run as two programs so that each can be timed
    first_B, logits_BV, carry = _prefill_rows(engine, params, carry, jnp.asarray(toks),
                                              jnp.asarray(mask), _step_key(key, 0), settings,
                                              do_sample=do_sample, num_beams=num_beams)
    jax.block_until_ready(first_B)
    t1 = time.perf_counter()
    if num_beams > 1:
        out_BN, _, carry = _beam_loop(engine, params, carry, logits_BV, jnp.int32(max_new_tokens),
                                      eos, jnp.float32(length_penalty), num_beams=num_beams,
                                      n_out=n_out)
    else:
        out_BN, carry = _decode_loop(engine, params, carry, first_B, jnp.asarray(live), key,
                                     settings, jnp.int32(max_new_tokens), eos, n_out=n_out,
                                     do_sample=do_sample)
    out = np.asarray(out_BN)
    t2 = time.perf_counter()
    del carry
    result = [_cut(out[b], max_new_tokens, eos_id) for b in range(len(seqs))]
    stats = GenerateStats(batch=len(seqs), prompt_tokens=sum(map(len, seqs)),
                          new_tokens=sum(map(len, result)), ttft_s=t1 - t0, decode_s=t2 - t1,
                          compiled=compiled_count() != before)
    return result, stats


# ------------------------------------------------------------------------------ streaming


@functools.partial(jax.jit, static_argnames=("engine", "do_sample"), donate_argnames=("carry",))
def _step(engine, params, carry, tok_B, key, settings, *, do_sample):
    logits_BV, carry = engine.step(params, carry, tok_B)
    return next_token(key, logits_BV, settings, do_sample), carry


def stream(model, params, prompt: Sequence[int], *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int | None = None, rng: Any = None,
           stats: GenerateStats | None = None) -> Iterator[int]:
    """Yields one prompt's new tokens as they are produced (a Python loop over a jitted
    decode step; same tokens as `generate` with the same settings and rng). Stops after
    EOS (yielded) or max_new_tokens. A GenerateStats passed as `stats` is filled in when
    the stream ends; its decode time includes the caller's time between tokens.
    """
    engine = make_engine(model)
    (seq,) = validate(engine.config, [prompt], max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                      num_beams=1, seq2seq=engine.seq2seq)
    rows, width, _, slots = plan(engine, [seq], max_new_tokens)
    toks, mask = _pack([seq], rows, width)
    key, do_sample = _key(rng), temperature > 0
    settings = _settings(temperature, top_k, top_p)
    before = compiled_count()
    t0 = time.perf_counter()
    carry = _alloc(engine, rows, slots, width)
    tok_B, _, carry = _prefill(engine, params, carry, jnp.asarray(toks), jnp.asarray(mask),
                               _step_key(key, 0), settings, do_sample=do_sample)
    tok = int(tok_B[0])
    t1 = time.perf_counter()
    n = 1
    yield tok
    while tok != eos_id and n < max_new_tokens:
        tok_B, carry = _step(engine, params, carry, tok_B, _step_key(key, n), settings,
                             do_sample=do_sample)
        tok, n = int(tok_B[0]), n + 1
        yield tok
    if stats is not None:
        stats.__dict__.update(batch=1, prompt_tokens=len(seq), new_tokens=n, ttft_s=t1 - t0,
                              decode_s=time.perf_counter() - t1,
                              compiled=compiled_count() != before)
