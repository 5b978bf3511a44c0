"""RL rollouts from fmzoo's own decoder, and the training forward's log-probs of them.

`rollout` samples `group_size` completions per prompt with the KV-cache decoder (one
compiled prefill + decode loop, sharded by the mesh rules) and packs prompt + completion
into FIXED shapes, so neither the decoder nor the update step recompiles between steps:
the decoder's prompt width is max_length - max_new_tokens whatever the batch's prompts,
and every array is [N, max_length], N = prompts x group_size.

The decoder records each chosen token's log-prob under log_softmax(logits / temperature)
(temperature 1 when greedy), before top-k / top-p: the distribution `sequence_logps`
recomputes with one teacher-forced forward, so old_logps == sequence_logps(...) on a fresh
rollout (tests/test_rl.py), and the first update's ratio is exactly 1.

Shape letters: N rows (completions), T = max_length, P the decoder's prompt width (bucketed),
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmzoo.infer import decoder_for, sampling_settings, validate
from fmzoo.infer.generate import GenerationError, plan
from fmzoo.infer.generate import eos_ids as _valid_eos_ids
from fmzoo.infer.processors import eos_array

from .rl_losses import action_mask, token_logps


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One rollout batch (host numpy). Rows r*G .. r*G + G - 1 are prompt r's group.

    tokens        int32[N, T]    prompt + completion, right-padded with 0
    mask          int32[N, T]    1 on real tokens
    response_mask float32[N, T]  1 on completion tokens, the EOS included
    old_logps     float32[N, T]  aligned as targets: position t holds the sampling
                                 log-prob of tokens[:, t + 1] (0 off the completion)
    has_eos       bool[N]        the completion ended with an EOS id (not max_new_tokens)
    prompt_index  int32[N]       which prompt of the call the row answers
    """

    tokens: np.ndarray
    mask: np.ndarray
    response_mask: np.ndarray
    old_logps: np.ndarray
    has_eos: np.ndarray
    prompt_index: np.ndarray
    completion_ids: list[list[int]]
    completions: list[str]
    group_size: int
    temperature: float  # the log-probs' temperature (1.0 for a greedy rollout)
    seconds: float = 0.0  # wall time of the sampling (the first call includes compiling)

    @property
    def completion_lengths(self) -> np.ndarray:
        return self.response_mask.sum(1).astype(np.int32)

    def expand(self, per_prompt: Sequence[Any]) -> list:
        """A per-prompt list (prompt texts, answers) -> one entry per row."""
        return [per_prompt[i] for i in self.prompt_index.tolist()]

    def metrics(self) -> dict[str, float]:
        """Completion statistics with TRL's names (GRPO's completion_length too)."""
        lengths = self.completion_lengths
        speed = {"timing/rollout_s": self.seconds,
                 "rollout_tokens_per_s": float(lengths.sum()) / self.seconds} \
            if self.seconds > 0 else {}
        return {**speed, "completion_length": float(lengths.mean()),
                "completions/mean_length": float(lengths.mean()),
                "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(1.0 - self.has_eos.mean())}

    def arrays(self) -> dict[str, np.ndarray]:
        """The batch a loss takes (the array fields)."""
        return {"tokens": self.tokens, "mask": self.mask, "response_mask": self.response_mask,
                "old_logps": self.old_logps, "has_eos": self.has_eos}


# -------------------------------------------------------------------------- checks


def _check(model, prompts_ids, group_size, max_new_tokens, max_length) -> list[list[int]]:
    config = getattr(model, "config", None)
    if not (hasattr(model, "init_cache") and hasattr(config, "vocab_size")) or \
            hasattr(config, "src_vocab_size"):
        raise GenerationError(f"rollouts need a decoder-only zoo model (fmzoo.models.build), "
                              f"got {type(model).__name__}")
    if not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise GenerationError(f"group_size must be an integer >= 1 (completions per prompt), "
                              f"got {group_size!r}")
    if not isinstance(max_length, numbers.Integral) or not 1 < max_length <= config.max_len:
        raise GenerationError(f"max_length must be an integer in [2, {config.max_len}] (the "
                              f"model's max_len), got {max_length!r}")
    if not isinstance(max_new_tokens, numbers.Integral) or not 0 < max_new_tokens < max_length:
        raise GenerationError(f"max_new_tokens must be an integer in [1, max_length), got "
                              f"{max_new_tokens!r} with max_length={max_length}")
    width = max_length - max_new_tokens
    seqs = validate(config, prompts_ids, max_new_tokens=1)
    long = [i for i, p in enumerate(seqs) if len(p) > width]
    if long:
        raise GenerationError(f"prompt {long[0]} has {len(seqs[long[0]])} tokens but only "
                              f"{width} fit (max_length {max_length} - max_new_tokens "
                              f"{max_new_tokens}); raise max_length or drop longer prompts")
    return seqs


def _cut(row: np.ndarray, max_new: int, eos: tuple[int, ...]) -> tuple[list[int], bool]:
    """(new tokens cut as generate cuts them, whether the row ended with an EOS)."""
    from fmzoo.infer.generate import _cut as cut
    out = cut(row, max_new, eos)
    return out, bool(out) and out[-1] in eos


# -------------------------------------------------------------------------- rollout


def rollout(model, params, tokenizer, prompts_ids: Sequence[Sequence[int]], *,
            group_size: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
            top_p: float = 1.0, eos_ids: Sequence[int] | int | None = None, rng: Any = None,
            mesh: Any = None, max_length: int) -> Rollout:
    """Samples group_size completions for each prompt (token ids, chat template already
    applied) and packs them into a Rollout of N = len(prompts_ids) * group_size rows and
    max_length columns. Prompts are read through a decoder of prompt width
    max_length - max_new_tokens, so one compiled decoder serves every step with the same
    number of prompts. eos_ids: the ids that end a completion (e.g. EOS and end-of-turn,
    models.chat.end_of_turn_ids). rng: a PRNG key or an int seed. `tokenizer` decodes the
    completions' text (special tokens skipped) for the reward functions; None leaves the
    texts empty."""
    start = time.perf_counter()
    seqs = _check(model, prompts_ids, group_size, max_new_tokens, max_length)
    config = model.config
    eos = _valid_eos_ids(eos_ids, config.vocab_size)
    validate(config, seqs, max_new_tokens=max_new_tokens, temperature=temperature,
             top_k=top_k, top_p=top_p, eos_id=list(eos))
    rows = [p for p in seqs for _ in range(group_size)]
    N, width = len(rows), max_length - max_new_tokens
    do_sample = temperature > 0
    # the shape from dummy prompts of the full width: the same for every call of the run
    shape = plan(model, [[0] * width] * N, max_new_tokens, do_sample=do_sample, logprobs=True)
    if mesh is not None:
        from fmzoo.infer.generate import _auto_axes
        from fmzoo.models.registry import place_params
        mesh = _auto_axes(mesh)
        params = place_params(params, config, mesh)
    dec, _ = decoder_for(model, shape, mesh)
    prompt_BP = np.zeros((shape.rows, shape.width), np.int32)
    mask_BP = np.zeros((shape.rows, shape.width), bool)
    mask_BP[:, 0] = True  # filler rows hold one token 0 (they start done)
    for b, p in enumerate(rows):
        prompt_BP[b, :len(p)], mask_BP[b, :len(p)] = p, True
    live_B = np.arange(shape.rows) < N
    key = jax.random.key(int(rng)) if isinstance(rng, numbers.Integral) else (
        jax.random.key(0) if rng is None else rng)
    settings = sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p)
    state = dec.prefill(params, dec.alloc(), jnp.asarray(prompt_BP), jnp.asarray(mask_BP),
                        jnp.asarray(live_B))
    out_BN, state = dec.decode(params, state, key, settings, eos_array(eos),
                               jnp.int32(max_new_tokens))
    out_BN, logp_BN = np.asarray(out_BN), np.asarray(state.logp_BN)
    del state
    out = _pack(rows, out_BN, logp_BN, eos, max_new_tokens, max_length, group_size,
                float(temperature) if do_sample else 1.0, tokenizer)
    return dataclasses.replace(out, seconds=time.perf_counter() - start)


def _pack(rows, out_BN, logp_BN, eos, max_new, T, group_size, temperature, tokenizer
          ) -> Rollout:
    N = len(rows)
    tokens = np.zeros((N, T), np.int32)
    mask = np.zeros((N, T), np.int32)
    response = np.zeros((N, T), np.float32)
    old_logps = np.zeros((N, T), np.float32)
    has_eos = np.zeros((N,), bool)
    completion_ids = []
    for b, p in enumerate(rows):
        c, has_eos[b] = _cut(out_BN[b], max_new, eos)
        n, k = len(p), len(c)
        tokens[b, :n], tokens[b, n:n + k] = p, c
        mask[b, :n + k] = 1
        response[b, n:n + k] = 1.0
        old_logps[b, n - 1:n - 1 + k] = logp_BN[b, :k]  # position t predicts token t + 1
        completion_ids.append(c)
    texts = [tokenizer.decode(c) for c in completion_ids] if tokenizer is not None else \
        [""] * N
    return Rollout(tokens=tokens, mask=mask, response_mask=response, old_logps=old_logps,
                   has_eos=has_eos, prompt_index=np.arange(N, dtype=np.int32) // group_size,
                   completion_ids=completion_ids, completions=texts, group_size=group_size,
                   temperature=temperature)


# ------------------------------------------------------------------------ log-probs


def forward_logps(model, params, tokens_NT, mask_NT, temperature=1.0, *, rngs=None,
                  deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """One teacher-forced forward (positions from the mask, the mask as padding mask):
    (target-aligned log-probs [N, T] of log_softmax(logits / temperature), the logits
    [N, T, V] in fp32, for the entropy). Not jitted: losses call it inside their step."""
    mask_NT = jnp.asarray(mask_NT, jnp.int32)
    positions_NT = jnp.maximum(jnp.cumsum(mask_NT, axis=-1) - 1, 0).astype(jnp.int32)
    logits_NTV = model.apply({"params": params}, jnp.asarray(tokens_NT, jnp.int32),
                             positions_BT=positions_NT, padding_mask_BT=mask_NT,
                             deterministic=deterministic, rngs=rngs).astype(jnp.float32)
    return token_logps(logits_NTV, tokens_NT, temperature), logits_NTV


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logps(model, params, tokens_NT, mask_NT, response_mask_NT, temperature):
    logps_NT, _ = forward_logps(model, params, tokens_NT, mask_NT, temperature)
    return logps_NT * action_mask(response_mask_NT)


def sequence_logps(model, params, tokens_NT, mask_NT, response_mask_NT,
                   temperature: float = 1.0) -> jax.Array:
    """The policy's (or reference's) per-token log-probs of a rollout, aligned and masked
    like Rollout.old_logps: float32[N, T], jitted (one compile per model and shape; the
    temperature is traced). Pass the Rollout's `temperature`."""
    return _sequence_logps(model, params, jnp.asarray(tokens_NT, jnp.int32),
                           jnp.asarray(mask_NT, jnp.int32),
                           jnp.asarray(response_mask_NT, jnp.float32), jnp.float32(temperature))
