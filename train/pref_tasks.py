"""Embedded preference pairs from the instruction tasks (train/tasks.py), offline.

`examples(name, split, **knobs)`: the task names, knobs and disjoint splits of SFT
(`tasks/mix`, `tasks/add`, ...), each prompt paired as chosen = the correct answer and
rejected = a plausible wrong one, made by a task-aware corruption seeded by the knob `seed`
and the prompt (so a pair does not depend on its position): arithmetic and counts one off
in one digit, words with two neighbouring different letters swapped (an all-same-letter
word loses or gains a letter). The task's checker confirms every rejected answer is wrong.

`model_pairs(...)`: pairs from a model's own samples (one compiled decoder for all prompts)
labelled by a checker: chosen = a correct sample (else the reference answer), rejected = a
wrong, non-empty sample; a prompt whose samples are all right gives no pair.
`write_jsonl(records, path)` writes pairs as TRL preference JSONL, atomically.

Records are TRL conversational preference dicts: {"prompt": [user message], "chosen":
[assistant message], "rejected": [assistant message], "task", "answer"}.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from fmzoo.train import tasks as tasks_lib


def _rng(seed: int, prompt: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    return np.random.default_rng(list(np.frombuffer(digest[:16], np.uint32)))


def _digit_off(answer: str, rng: np.random.Generator) -> str:
    """One digit one up or down; the first of several digits never becomes 0."""
    j = int(rng.integers(len(answer)))
    d = int(answer[j])
    step = int(rng.choice([-1, 1]))
    if not 0 <= d + step <= 9 or (d + step == 0 and j == 0 and len(answer) > 1):
        step = -step
    return answer[:j] + str(d + step) + answer[j + 1:]


def _letters_off(answer: str, rng: np.random.Generator) -> str:
    """Two neighbouring different letters swapped; else one letter fewer (or more)."""
    spots = [j for j in range(len(answer) - 1) if answer[j] != answer[j + 1]]
    if spots:
        j = spots[int(rng.integers(len(spots)))]
        return answer[:j] + answer[j + 1] + answer[j] + answer[j + 2:]
    return answer[:-1] if len(answer) > 1 else answer * 2


def corrupt(task: str, answer: str, rng: np.random.Generator) -> str:
    """A plausible wrong answer of `task` (add, sub, reverse, sort, count)."""
    if task in ("add", "sub"):
        return _digit_off(answer, rng)
    if task == "count":
        n = int(answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    if task in ("reverse", "sort"):
        return _letters_off(answer, rng)
    raise ValueError(f"no corruption for task {task!r}; tasks: {', '.join(tasks_lib.TASK_NAMES)}")


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def pair(example: dict, chosen: str, rejected: str) -> dict[str, Any]:
    """A TRL conversational preference record of a task example and two replies."""
    return {"prompt": _messages(example["prompt"]),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "task": example.get("task"), "answer": example.get("answer")}


def wrong_answer(example: dict, seed: int = 0) -> str:
    """The corrupted answer of a task example; the task's checker confirms it is wrong."""
    wrong = corrupt(example["task"], str(example["answer"]), _rng(seed, example["prompt"]))
    if not wrong or tasks_lib.checker_for(example["task"])(example, wrong):
        raise AssertionError(f"corrupting {example!r} gave the right answer {wrong!r}")
    return wrong


def examples(name: str, split: str, **knobs) -> list[dict[str, Any]]:
    """The preference pairs of `tasks/<task>` or `tasks/mix` (see the module docstring)."""
    seed = tasks_lib.check_knobs(knobs)["seed"]
    return [pair(e, e["answer"], wrong_answer(e, seed))
            for e in tasks_lib.examples(name, split, **knobs)]


def model_pairs(model, params, tokenizer, examples: Sequence[dict], *, samples: int = 4,
                temperature: float = 1.0, max_new_tokens: int = 32, seed: int = 0,
                checker: Callable[[Any, str], float] | None = None) -> list[dict[str, Any]]:
    """Preference pairs from the model's own samples (see the module docstring).

    examples: task examples ({"prompt", "answer", "task"}, e.g. train/tasks.py) or records
    whose "prompt" is a message list; checker(example, completion) -> score > 0 when right
    (default: the example's task checker). `samples` replies per prompt at `temperature`,
    all prompts in one generate call (one compiled decoder), seeded by `seed`."""
    from fmzoo.infer import generate
    from fmzoo.models import chat
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (at 0 every sample of a prompt is the same "
                         f"greedy reply), got {temperature}")
    if checker is None and any(not e.get("task") for e in examples):
        raise ValueError("an example has no \"task\", so there is no checker to label its "
                         "samples; pass checker=")
    if not examples:
        return []
    prompts = [chat.apply_chat_template(tokenizer, _messages(e["prompt"]),
                                        add_generation_prompt=True) for e in examples]
    eos = chat.end_of_turn_ids(tokenizer)
    outs = generate(model, params, [p for p in prompts for _ in range(samples)],
                    max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos,
                    rng=seed)
    records = []
    for k, e in enumerate(examples):
        check = checker or tasks_lib.checker_for(e["task"])
        texts = [tokenizer.decode([t for t in o if t not in eos])
                 for o in outs[k * samples:(k + 1) * samples]]
        right = [t for t in texts if check(e, t) > 0]
        wrong = [t for t in texts if check(e, t) <= 0 and t]
        if wrong:
            records.append(pair(e, right[0] if right else str(e["answer"]), wrong[0]))
    return records


def write_jsonl(records: Sequence[dict], path: str) -> str:
    """Writes `records` as TRL preference JSONL at `path` (checked first, atomic: a failure
    leaves no file); returns the absolute path."""
    from fmzoo.train import pref_records
    if not records:
        raise ValueError("no preference records to write (every prompt was answered right?)")
    for i, r in enumerate(records):
        pref_records.parse_record(r, f"record {i}")  # what is written reads back
    path = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
