"""`fmzoo label` (RLAIF): preference pairs labelled by a judge instead of people.

For each prompt the policy samples TWO responses (train/rollout.rollout, group_size=2, in
fixed-size chunks of prompts so that one compiled decoder serves every chunk), a judge
(train/judges.py) gives p = P(first better), and the pair is written in TRL's preference
format, which `fmzoo dpo` and `fmzoo reward` read unchanged (train/pref_records.py):

    {"prompt": P, "chosen": C, "rejected": R, "chosen_probability": max(p, 1 - p),
     <the prompt's extra columns, e.g. "answer", "task">}

P is the prompt as the data gave it (a string, or messages: then C and R are assistant
messages). Pairs the judge cannot order are skipped and counted: identical responses and
exact ties (p == 0.5) as `ties`, and pairs with an empty response (pref_records refuses
those) as `empty`. The file is written at the end, atomically (a temporary file in the same
directory, then a rename): an error at any point leaves no output, nor a partial one.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from typing import Any

import numpy as np

RESERVED = ("prompt", "chosen", "rejected", "margin", "chosen_probability")


class LabelError(ValueError):
    """A `fmzoo label` input that cannot be used."""


def _check_settings(out, max_new_tokens, temperature, top_k, top_p, batch_size, limit):
    if not isinstance(out, str) or not out.lower().endswith(".jsonl"):
        raise LabelError(f"--out {out!r}: name a .jsonl file (e.g. --out pairs.jsonl): "
                         "`fmzoo dpo` and `fmzoo reward` read .jsonl files")
    if os.path.isdir(out):
        raise LabelError(f"--out {out} is a directory; name a .jsonl file")
    for flag, v, low in (("--max-new-tokens", max_new_tokens, 1), ("--batch-size", batch_size, 1),
                         ("--top-k", top_k, 0)):
        if not isinstance(v, numbers.Integral) or v < low:
            raise LabelError(f"{flag} must be an integer >= {low}, got {v!r}")
    if limit is not None and (not isinstance(limit, numbers.Integral) or limit < 1):
        raise LabelError(f"--limit must be an integer >= 1, got {limit!r}")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and temperature > 0):
        raise LabelError(f"--temperature must be > 0, got {temperature!r}: greedy decoding "
                         "gives the same response twice, so there would be nothing to judge")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise LabelError(f"--top-p must be in (0, 1], got {top_p!r}")


def _policy(model: Any, tokenizer: str | None):
    """(Loaded, tokenizer) of --model and --tokenizer; only decoder-only LMs sample."""
    import fmzoo
    from fmzoo.models.bundle import Loaded
    from fmzoo.models.config import LMConfig
    from fmzoo.models.tokenizer import ByteTokenizer
    loaded = model if isinstance(model, Loaded) else fmzoo.load(model)
    c = loaded.config
    if not isinstance(c, LMConfig) or c.head != "lm":
        kind = "a reward model (score head)" if getattr(c, "head", None) == "score" else \
            f"a {getattr(c, 'family', type(c).__name__)} model"
        raise LabelError(f"--model {loaded.source or model}: {kind} cannot sample responses; "
                         "the policy is a decoder-only language model (e.g. an SFT workdir)")
    from .judges import tokenizer_option
    tok = tokenizer_option(tokenizer, "--tokenizer", LabelError) or loaded.tokenizer or \
        ByteTokenizer()
    if tok.vocab_size > c.vocab_size:
        raise LabelError(f"the tokenizer has {tok.vocab_size} tokens but the policy's "
                         f"vocabulary is {c.vocab_size}; pass the policy's own --tokenizer")
    return loaded, tok


def _eos_ids(loaded, tok) -> list[int]:
    from fmzoo.models import chat
    ids = chat.end_of_turn_ids(tok)
    ids += [i for i in getattr(loaded.generation, "eos_ids", ()) if i not in ids]
    return [i for i in ids if 0 <= i < loaded.config.vocab_size]


def _response(prompt: Any, text: str) -> Any:
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def label(model: Any, judge: Any, data: str, out: str, *, max_new_tokens: int = 64,
          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
          limit: int | None = None, max_length: int | None = None,
          tokenizer: str | None = None, judge_tokenizer: str | None = None,
          batch_size: int = 16, data_options: dict | None = None,
          progress: bool = True, split: str = "train") -> dict:
    """Samples two responses per prompt of `data`, judges them, writes `out` (see the module
    notes) and returns the summary {out, prompts, pairs, ties, empty, mean_confidence
    (mean |p - 0.5| of the written pairs), truncated (judging inputs cut to fit)}.

    model: a preset / workdir / HF dir (or an fmzoo.load result); judge: a judge spec
    (train/judges.load_judge) or a judge object; data: tasks/NAME or a prompt JSONL
    (train/prompt_data.load_prompts, `split`: train unless told). Every check runs before
    sampling."""
    import jax
    from tqdm.auto import tqdm

    from . import prompt_data
    from .judges import load_judge
    from .rollout import rollout

    _check_settings(out, max_new_tokens, temperature, top_k, top_p, batch_size, limit)
    loaded, tok = _policy(model, tokenizer)
    T = loaded.config.max_len if max_length is None else max_length
    if not isinstance(T, numbers.Integral) or not max_new_tokens < T <= loaded.config.max_len:
        raise LabelError(f"--max-length must be in (max_new_tokens={max_new_tokens}, the "
                         f"policy's max_len={loaded.config.max_len}], got {T!r}")
    judge_obj = load_judge(judge, tokenizer=judge_tokenizer) if isinstance(judge, str) \
        else judge
    if not hasattr(judge_obj, "probabilities"):
        raise LabelError(f"--judge must be a judge spec or an object with probabilities(), "
                         f"got {type(judge_obj).__name__}")
    prompts = prompt_data.load_prompts(data, tok, split=split, limit=limit,
                                       **(data_options or {}))
    width = T - max_new_tokens
    long = [i for i, p in enumerate(prompts) if len(p["prompt_ids"]) > width]
    if long:
        raise LabelError(f"{len(long)} of {len(prompts)} prompts are longer than {width} "
                         f"tokens (the first: prompt {long[0]}, "
                         f"{len(prompts[long[0]]['prompt_ids'])} tokens), which is --max-length "
                         f"{T} - --max-new-tokens {max_new_tokens}; raise --max-length or "
                         "lower --max-new-tokens")
    eos = _eos_ids(loaded, tok)
    B = min(batch_size, len(prompts))
    key = jax.random.key(seed)
    records, ties, empty, confidence = [], 0, 0, []
    truncated_before = getattr(judge_obj, "truncated", 0)
    with tqdm(total=len(prompts), desc="label", unit="prompt", disable=not progress) as bar:
        for c, start in enumerate(range(0, len(prompts), B)):
            chunk = prompts[start:start + B]
            ids = [p["prompt_ids"] for p in chunk]
            ids += [ids[0]] * (B - len(ids))  # a full chunk: the same compiled decoder
            r = rollout(loaded.model, loaded.params, tok, ids, group_size=2,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_ids=eos, rng=jax.random.fold_in(key, c),
                        max_length=T)
            a, b = r.completions[0:2 * len(chunk):2], r.completions[1:2 * len(chunk):2]
            raw = [p["prompt"] for p in chunk]
            cols = prompt_data.columns(chunk)
            probs = np.asarray(judge_obj.probabilities(
                raw, [_response(p, x) for p, x in zip(raw, a)],
                [_response(p, x) for p, x in zip(raw, b)], **cols), np.float64)
            if probs.shape != (len(chunk),) or not np.isfinite(probs).all():
                raise LabelError(f"the judge returned {probs.shape} probabilities (finite: "
                                 f"{bool(np.isfinite(probs).all())}) for {len(chunk)} pairs; "
                                 "a judge returns one finite probability per pair")
            for k, p in enumerate(chunk):
                if not a[k] or not b[k]:
                    empty += 1
                    continue
                if a[k] == b[k] or probs[k] == 0.5:
                    ties += 1
                    continue
                win, lose = (a[k], b[k]) if probs[k] > 0.5 else (b[k], a[k])
                conf = max(probs[k], 1.0 - probs[k])
                confidence.append(conf - 0.5)
                extra = {k2: v for k2, v in p["columns"].items() if k2 not in RESERVED}
                records.append({"prompt": p["prompt"], "chosen": _response(p["prompt"], win),
                                "rejected": _response(p["prompt"], lose),
                                "chosen_probability": float(conf), **extra})
            bar.update(len(chunk))
    if not records:
        raise LabelError(f"no pair to write: of {len(prompts)} prompts, {ties} gave tied or "
                         f"identical responses and {empty} an empty one; sample more varied "
                         "responses (raise --temperature or --max-new-tokens) or use more "
                         "prompts")
    _write_jsonl_atomic(out, records)
    return {"out": out, "prompts": len(prompts), "pairs": len(records), "ties": ties,
            "empty": empty, "mean_confidence": float(np.mean(confidence)),
            "truncated": getattr(judge_obj, "truncated", 0) - truncated_before}


label_pairs = label  # the name fmzoo.train exports (fmzoo.train.label is this module)


def _write_jsonl_atomic(path: str, records: list[dict]) -> None:
    """All lines to a temporary file beside `path`, then one rename: readers see the old
    file or the whole new one, never part of it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
