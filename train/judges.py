"""Pairwise judges (RLAIF): which of two responses to a prompt is better, as a probability.

Every judge has one method, TRL-like:

    judge.probabilities(prompts, first, second, **columns) -> float32[N]
        = P(first[i] is better than second[i]) in [0, 1]

prompts are strings or TRL message lists; responses strings (or assistant message lists).
`columns` are the data's extra per-row columns (answer, task, ...), read by function judges.

- LMJudge: a language model shown a FIXED judging template (the prompt, "Response 1",
  "Response 2", then a question whose answer is the next token). The preference is read
  from the next-token logits of the label tokens "1" and "2", renormalised over those two,
  in BOTH orders; P(a) = (p_ab("1") + p_ba("2")) / 2 cancels position bias (Lee et al.
  2023, RLAIF), so probabilities(p, a, b) == 1 - probabilities(p, b, a).
- RewardModelJudge: P = sigmoid(r_first - r_second) from a reward model's scores.
- FunctionJudge: a TRL reward function (e.g. an embedded task's checker): P = 1, 0, or 0.5
  on a tie.

`load_judge(spec)` builds one from a model (preset, workdir, HF dir), 'checker',
'tasks/NAME' or 'module:function'. A judge reads TEXT and encodes it with its OWN
tokenizer: the policy's ids mean nothing to another vocabulary.

Shape letters: B rows of one judging forward (both orders of every pair), T tokens.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Protocol, Sequence

import numpy as np

DEFAULT_TEMPLATE = ("Which response answers the prompt better?\n"
                    "Prompt: {prompt}\n"
                    "Response 1: {first}\n"
                    "Response 2: {second}\n"
                    "Answer with one digit, 1 or 2.")
LABELS = ("1", "2")


class JudgeError(ValueError):
    """A judge that cannot be built, or input it cannot judge."""


class PairwiseJudge(Protocol):
    def probabilities(self, prompts: Sequence[Any], first: Sequence[Any],
                      second: Sequence[Any], **columns: Sequence[Any]) -> np.ndarray:
        """float32[N]: P(first[i] is better than second[i]) in [0, 1]."""


# ------------------------------------------------------------------------------ text


def as_text(value: Any, what: str) -> str:
    """A prompt / response as plain text: a string, or message contents joined by role."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        if len(value) == 1 or all(m.get("role") == "assistant" for m in value):
            return "\n".join(m["content"] for m in value)
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in value)
    raise JudgeError(f"a judge reads text: {what} is {type(value).__name__} {value!r:.60}; "
                     "pass strings or {'role', 'content'} message lists (decode token ids "
                     "with the policy's tokenizer first)")


def _check_lengths(prompts, first, second, columns) -> int:
    n = len(prompts)
    if len(first) != n or len(second) != n:
        raise JudgeError(f"a judge needs one first and one second response per prompt; got "
                         f"{n} prompts, {len(first)} first and {len(second)} second responses")
    for k, v in columns.items():
        if len(v) != n:
            raise JudgeError(f"column {k!r} has {len(v)} values for {n} prompts; give one per "
                             "prompt")
    return n


def _bucket(n: int, limit: int) -> int:
    """A power of two (at least 16), at most `limit`: few shapes, few compiles."""
    size = 16
    while size < n:
        size *= 2
    return min(size, limit)


# -------------------------------------------------------------------------- LM judge


@functools.cache
def _label_probs():
    """The jitted judging forward (built once; the model is static, so one compile per
    model and (rows, bucket) shape): the prefill's next-token logits at each row's last
    real token, softmax over the two label ids -> float32[B, 2]."""
    import jax
    import jax.numpy as jnp

    def run(model, params, tokens_BT, mask_BT, labels_2):
        # prefill reads logits at the last real token only: no [B, T, V] logits in memory
        cache = model.init_cache(tokens_BT.shape[0], tokens_BT.shape[1])
        logits_BV, _ = model.apply({"params": params}, tokens_BT, mask_BT, cache,
                                   method=model.prefill)
        return jax.nn.softmax(logits_BV[:, labels_2].astype(jnp.float32), axis=-1)
    return jax.jit(run, static_argnums=0)


def _label_id(tokenizer, label: str, vocab: int) -> int:
    ids = list(tokenizer.encode(label))
    if len(ids) != 1:
        raise JudgeError(f"the judge's tokenizer encodes the label {label!r} as {len(ids)} "
                         f"tokens {ids}; an LM judge reads the next-token probability of "
                         "'1' and '2', so each must be one token: use a judge model whose "
                         "tokenizer has single-token digits")
    if not 0 <= ids[0] < vocab:
        raise JudgeError(f"the judge's tokenizer gives {label!r} the id {ids[0]}, outside the "
                         f"judge model's vocabulary of {vocab}; pass the judge's own tokenizer")
    return int(ids[0])


class LMJudge:
    """A language model as a pairwise judge (see the module notes). `max_length`: the
    longest judging input (default the model's max_len); longer inputs have their longest
    fields (prompt, responses) cut to fit, and `truncated` counts them. `batch_size`: rows
    per forward (both orders of a pair are two rows)."""

    def __init__(self, model: Any, params: Any, tokenizer: Any, *,
                 template: str = DEFAULT_TEMPLATE, max_length: int | None = None,
                 batch_size: int = 16):
        config = getattr(model, "config", None)
        if not hasattr(model, "prefill") or not hasattr(config, "vocab_size") or \
                hasattr(config, "src_vocab_size") or getattr(config, "head", "lm") != "lm":
            raise JudgeError(f"an LM judge needs a decoder-only language model (head 'lm'), "
                             f"got {type(model).__name__}"
                             + (" with a score head: use RewardModelJudge"
                                if getattr(config, "head", None) == "score" else ""))
        if tokenizer is None:
            raise JudgeError("an LM judge needs its own tokenizer (the judge model's)")
        if tokenizer.vocab_size > config.vocab_size:
            raise JudgeError(f"the judge was handed a tokenizer of {tokenizer.vocab_size} "
                             f"tokens but the judge model's vocabulary is {config.vocab_size}:"
                             " they do not belong together; pass the judge model's own "
                             "tokenizer (a judge reads text, so it need not share the "
                             "policy's)")
        for key in ("{prompt}", "{first}", "{second}"):
            if key not in template:
                raise JudgeError(f"the judging template has no {key}; it must hold {{prompt}},"
                                 " {first} and {second}")
        self.model, self.params, self.tokenizer, self.template = model, params, tokenizer, \
            template
        self.max_length = config.max_len if max_length is None else int(max_length)
        if not 16 <= self.max_length <= config.max_len:
            raise JudgeError(f"max_length must be in [16, the judge's max_len={config.max_len}]"
                             f", got {max_length}")
        if batch_size < 2 or batch_size % 2:
            raise JudgeError(f"batch_size must be an even number >= 2 (both orders of a pair),"
                             f" got {batch_size}")
        self.batch_size = batch_size
        self.labels = np.asarray([_label_id(tokenizer, x, config.vocab_size) for x in LABELS],
                                 np.int32)
        self.chat = _has_chat_template(tokenizer)
        self.overhead = len(self._ids("", "", ""))
        if self.overhead >= self.max_length:
            raise JudgeError(f"the judging template alone takes {self.overhead} tokens, at "
                             f"least max_length={self.max_length}; shorten the template")
        self.truncated = 0

    def _ids(self, prompt: str, first: str, second: str) -> list[int]:
        text = self.template.format(prompt=prompt, first=first, second=second)
        if self.chat:  # the reply opens with the label
            from fmzoo.models import chat
            return list(chat.apply_chat_template(
                self.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True))
        return list(self.tokenizer.encode(text + "\nAnswer: ",
                                          add_bos=self.tokenizer.bos_id is not None))

    def _fit(self, fields: list[str]) -> list[str]:
        """The fields, the longest cut (in tokens, from the end) until the input fits."""
        ids = [list(self.tokenizer.encode(f)) for f in fields]
        budget = self.max_length - self.overhead - 4  # slack: merges at the field edges
        if sum(map(len, ids)) <= budget:
            return fields
        self.truncated += 1
        cap = 0  # the largest per-field cap that fits (water-filling)
        while sum(min(len(x), cap + 1) for x in ids) <= budget:
            cap += 1
        return [self.tokenizer.decode(x[:cap]) if len(x) > cap else f
                for f, x in zip(fields, ids)]

    def _rows(self, prompt: str, a: str, b: str) -> list[list[int]]:
        p, a, b = self._fit([prompt, a, b])
        rows = [self._ids(p, a, b), self._ids(p, b, a)]
        for r in rows:
            if len(r) > self.max_length:
                raise JudgeError(f"a judging input has {len(r)} tokens after cutting, over "
                                 f"max_length={self.max_length}; raise the judge's max_length")
            bad = [t for t in r if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise JudgeError(f"the judge's tokenizer produced id {bad[0]}, outside the judge"
                                 f" model's vocabulary of {self.model.config.vocab_size}; pass "
                                 "the judge model's own tokenizer")
        return rows

    def label_probs(self, rows: list[list[int]]) -> np.ndarray:
        """float32[len(rows), 2]: softmax over the logits of '1' and '2' after each row."""
        out = []
        B = self.batch_size
        for start in range(0, len(rows), B):
            chunk = rows[start:start + B]
            T = _bucket(max(map(len, chunk)), self.max_length)
            tokens = np.zeros((B, T), np.int32)
            mask = np.zeros((B, T), np.int32)
            for j, ids in enumerate(chunk):
                tokens[j, :len(ids)], mask[j, :len(ids)] = ids, 1
            mask[len(chunk):, 0] = 1  # filler rows: one token, so every row has a last one
            got = _label_probs()(self.model, self.params, tokens, mask, self.labels)
            out.append(np.asarray(got)[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def probabilities(self, prompts, first, second, **columns) -> np.ndarray:
        n = _check_lengths(prompts, first, second, columns)
        rows = []
        for i in range(n):
            rows += self._rows(as_text(prompts[i], f"prompt {i}"),
                               as_text(first[i], f"first response {i}"),
                               as_text(second[i], f"second response {i}"))
        p_N22 = self.label_probs(rows).reshape(n, 2, 2)
        # order (a, b): a is "1"; order (b, a): a is "2"
        return ((p_N22[:, 0, 0] + p_N22[:, 1, 1]) / 2).astype(np.float32)


def _has_chat_template(tokenizer) -> bool:
    # the byte tokenizer's template is built in; others need a chat_template
    return getattr(tokenizer, "kind", None) == "byte" or bool(
        getattr(tokenizer, "chat_template", None))


# ------------------------------------------------------------------ other judges


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # stable for large |x|


def _like_prompt(prompt: Any, response: Any) -> Any:
    """A response in the prompt's form (string, or assistant messages), as the reward model
    was trained on pairs of one form."""
    if isinstance(prompt, str):
        return as_text(response, "a response")
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return response


class RewardModelJudge:
    """P(first better) = sigmoid(r_first - r_second), r from train/reward.score."""

    def __init__(self, model: Any, params: Any, tokenizer: Any, *, batch_size: int = 32,
                 max_length: int | None = None):
        if getattr(getattr(model, "config", None), "head", None) != "score":
            raise JudgeError("a reward-model judge needs a reward model (a workdir written by "
                             "`fmzoo reward`, config head='score')")
        if tokenizer is None or tokenizer.vocab_size > model.config.vocab_size:
            raise JudgeError(f"the reward model's vocabulary is {model.config.vocab_size} but "
                             f"its judge was handed a tokenizer of "
                             f"{getattr(tokenizer, 'vocab_size', None)} tokens; pass the "
                             "reward model's own tokenizer")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def rewards(self, prompts, responses) -> np.ndarray:
        from .reward import score
        return np.asarray(score(self.model, self.params, self.tokenizer, list(prompts),
                                [_like_prompt(p, r) for p, r in zip(prompts, responses)],
                                batch_size=self.batch_size, max_length=self.max_length),
                          np.float32)

    def probabilities(self, prompts, first, second, **columns) -> np.ndarray:
        n = _check_lengths(prompts, first, second, columns)
        r = self.rewards(list(prompts) * 2, list(first) + list(second))
        return _sigmoid(r[:n] - r[n:])


class FunctionJudge:
    """A TRL reward function fn(prompts, completions, **columns) -> list[float] as a judge:
    P = 1 when the first response's reward is higher, 0 when lower, 0.5 on a tie."""

    def __init__(self, fn: Callable, name: str | None = None):
        if not callable(fn):
            raise JudgeError(f"a function judge needs a function (prompts, completions, "
                             f"**kwargs) -> list[float], got {type(fn).__name__}")
        self.fn, self.name = fn, name or getattr(fn, "__name__", "function")

    def probabilities(self, prompts, first, second, **columns) -> np.ndarray:
        from .rewards import _call
        n = _check_lengths(prompts, first, second, columns)
        kw = {k: list(v) * 2 for k, v in columns.items()}
        r = _call(self.fn, self.name, list(prompts) * 2,
                  [as_text(x, "a response") for x in list(first) + list(second)], **kw)
        return np.where(r[:n] > r[n:], 1.0, np.where(r[:n] < r[n:], 0.0, 0.5)).astype(
            np.float32)


def agreement(judge: PairwiseJudge, reference: PairwiseJudge, prompts, first, second,
              **columns) -> dict[str, float]:
    """How often `judge` prefers what `reference` (e.g. the task checker) prefers, over the
    pairs the reference orders (its ties left out): {agreement, pairs, reference_ties}.
    A judge's own tie (p == 0.5) counts as a disagreement."""
    q = np.asarray(reference.probabilities(prompts, first, second, **columns), np.float64)
    decided = q != 0.5
    if not decided.any():
        return {"agreement": float("nan"), "pairs": 0, "reference_ties": int(len(q))}
    keep = np.flatnonzero(decided)
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    p = np.asarray(judge.probabilities(pick(prompts), pick(first), pick(second),
                                       **{k: pick(v) for k, v in columns.items()}), np.float64)
    same = (p > 0.5) == (q[keep] > 0.5)
    return {"agreement": float(np.mean(same & (p != 0.5))), "pairs": int(len(keep)),
            "reference_ties": int(len(q) - len(keep))}


# --------------------------------------------------------------------------- loading


def tokenizer_option(path: str | None, flag: str, error: type = ValueError):
    """The tokenizer of a --tokenizer style option (None when not given); a directory
    without one -> `error` naming the flag."""
    if path is None:
        return None
    from fmzoo.models.tokenizer import load_tokenizer
    tok = load_tokenizer(path) if os.path.isdir(path) else None
    if tok is None:
        raise error(f"{flag} {path}: no tokenizer there; pass a directory holding "
                    "tokenizer.json (or leave it out for the model's own)")
    return tok


def is_model_spec(spec: str) -> bool:
    from fmzoo.models import PRESETS
    return spec in PRESETS or os.path.isdir(os.path.expanduser(spec))


def load_judge(spec: str, *, tokenizer: str | None = None, max_length: int | None = None,
               batch_size: int = 16, dtype: str | None = None) -> PairwiseJudge:
    """A judge from a spec:
      a preset, training workdir or Hugging Face dir -> LMJudge (a workdir or dir whose model
          has head 'score', i.e. from `fmzoo reward` -> RewardModelJudge);
      'checker' (each row's task column), 'tasks/NAME' -> FunctionJudge of the task checker;
      'module:function' -> FunctionJudge of that TRL reward function.
    `tokenizer`: a directory holding the judge's tokenizer, when its model dir has none."""
    from . import rewards
    if not isinstance(spec, str) or not spec.strip():
        raise JudgeError("--judge is empty: name a judge model (preset, workdir, HF dir), "
                         "'checker', tasks/NAME or module:function")
    if is_model_spec(spec):
        import fmzoo
        from fmzoo.models.config import LMConfig
        from fmzoo.models.tokenizer import ByteTokenizer
        loaded = fmzoo.load(spec, dtype=dtype)
        if not isinstance(loaded.config, LMConfig):
            raise JudgeError(f"--judge {spec} is a {loaded.config.family} model; a judge is a "
                             "decoder-only LM or a reward model")
        tok = tokenizer_option(tokenizer, "--judge-tokenizer", JudgeError) or \
            loaded.tokenizer or ByteTokenizer()
        if loaded.config.head == "score":
            return RewardModelJudge(loaded.model, loaded.params, tok, max_length=max_length,
                                    batch_size=max(batch_size, 1))
        return LMJudge(loaded.model, loaded.params, tok, max_length=max_length,
                       batch_size=batch_size)
    if rewards._is_task(spec):
        return FunctionJudge(rewards._build_task(spec), spec)
    if ":" in spec:
        return FunctionJudge(rewards.function_reward(spec), spec)
    raise JudgeError(f"--judge {spec!r} is not a judge: pass a model (a preset, a training "
                     "workdir or a Hugging Face dir; a reward-model workdir judges by its "
                     "scores), 'checker', an embedded task (tasks/add) or module:function")
