"""Embedded verifiable instruction tasks: prompts, exact answers and checkers, offline.

Tasks (names `tasks/<task>`; `tasks/mix` interleaves all of them):
- add:     "What is 37+58?" -> "95"        (operands of 1..digits digits)
- sub:     "What is 58-37?" -> "21"        (the first operand is never the smaller)
- reverse: "Reverse the word 'hello'." -> "olleh"
- sort:    "Sort the letters of 'hello' alphabetically." -> "ehllo"
- count:   "How many times does the letter 'l' appear in 'hello'?" -> "2"
Words are random lowercase letters of min_word..max_word letters.

`tasks/judge` (not part of the mix) teaches a language model to JUDGE: its prompt is exactly
train/judges.DEFAULT_TEMPLATE filled with a prompt of a base task and two responses, that
task's right answer and a wrong one, in a random order; the answer is "1" or "2", the
position of the right one. The wrong ones come in three kinds, a third each, from easy to
hard to tell apart: random characters of the answer's length and kind, one character
substituted (what a small policy's samples mostly get wrong), and train/pref_tasks'
near miss (a neighbour swap, one off). Every one is confirmed wrong by the checker; order
and kind are seeded by the knob `seed` and the prompt. `fmzoo sft --data tasks/judge`
renders the prompt through the chat template with the generation prompt, exactly what an
LMJudge shows its model, so the finetuned model is a judge (`fmzoo label --judge SFT_DIR`).
One judge example per base example: splits stay disjoint, counts are per base task.

Knobs (builder options, e.g. `--data-opt digits=3`): digits (2), min_word (3), max_word (5),
lsd_first (False: when True arithmetic answers are written least-significant digit first,
"95" -> "59", which a small model learns far more easily; the prompt says so), num_train
(5000), num_validation (200), num_test (500), seed (0), base ("mix": the base tasks of
tasks/judge, e.g. base=reverse or base=add,sub; other tasks refuse a base). Counts are per
task (the mix holds each task's examples). Splits share no prompt: distinct prompts are
drawn in one stream and dealt to test, then validation, then train; when a small space
(e.g. digits=1) runs out, train gets fewer examples. num_validation=0 / num_test=0 prepare
no such split.

A checker `check(prompt_or_example, completion) -> 1.0 | 0.0` recomputes the answer from the
prompt (or takes the example's "answer") and compares it with the completion after removing
surrounding whitespace and trailing end-of-turn markers: usable as an RL reward.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import numpy as np

TASK_NAMES = ("add", "sub", "reverse", "sort", "count")
PREFIX = "tasks/"
MIX = "mix"
JUDGE = "judge"
DEFAULTS = {"digits": 2, "min_word": 3, "max_word": 5, "lsd_first": False, "num_train": 5000,
            "num_validation": 200, "num_test": 500, "seed": 0, "base": MIX}
SPLITS = ("train", "validation", "test")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Trailing markers a decoded completion may still carry (bytes, Llama 3, ChatML, sentencepiece).
END_MARKERS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>", "</s>", "<eos>",
               "<|end_of_text|>")
_LSD_NOTE = " Write the digits of the answer in reverse order."

_ARITH_RE = re.compile(r"^What is (\d+)([+-])(\d+)\?( Write the digits.*)?$")
_REVERSE_RE = re.compile(r"^Reverse the word '([a-z]+)'\.$")
_SORT_RE = re.compile(r"^Sort the letters of '([a-z]+)' alphabetically\.$")
_COUNT_RE = re.compile(r"^How many times does the letter '([a-z])' appear in '([a-z]+)'\?$")


# ----------------------------------------------------------------------------- knobs, names


def task_names(name: str) -> tuple[str, ...]:
    """The tasks of an embedded name: 'tasks/add' -> ('add',), 'tasks/mix' -> all."""
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if short == MIX:
        return TASK_NAMES
    if short not in (*TASK_NAMES, JUDGE):
        raise ValueError(f"unknown task {name!r}; the embedded tasks are "
                         f"{', '.join(PREFIX + t for t in (*TASK_NAMES, MIX, JUDGE))}")
    return (short,)


def is_task_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def embedded_names() -> tuple[str, ...]:
    return tuple(PREFIX + t for t in (MIX, *TASK_NAMES, JUDGE))


def check_knobs(knobs: dict) -> dict:
    """The knobs with defaults filled in; an unknown or out-of-range knob -> ValueError."""
    unknown = sorted(set(knobs) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown task option(s) {unknown}; the tasks take "
                         f"{', '.join(f'{k}={v}' for k, v in DEFAULTS.items())}")
    k = dict(DEFAULTS)
    for key, value in knobs.items():
        default = DEFAULTS[key]
        if key == "base":
            k[key] = _check_base(value)
            continue
        try:
            if isinstance(default, bool):
                if isinstance(value, str) and value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = value.lower() in ("true", "1") if isinstance(value, str) else bool(value)
            else:
                value = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"task option {key}={value!r} must be "
                             f"{'true/false' if isinstance(default, bool) else 'an integer'}"
                             ) from None
        k[key] = value
    if not 1 <= k["digits"] <= 18:
        raise ValueError(f"task option digits={k['digits']} must be in 1..18")
    if not 1 <= k["min_word"] <= k["max_word"] <= 64:
        raise ValueError(f"task options need 1 <= min_word <= max_word <= 64, got "
                         f"min_word={k['min_word']}, max_word={k['max_word']}")
    for key in ("num_train", "num_validation", "num_test"):
        if k[key] < (1 if key == "num_train" else 0):
            raise ValueError(f"task option {key}={k[key]} must be >= "
                             f"{1 if key == 'num_train' else 0}")
    if not 0 <= k["seed"] < 2**32:
        raise ValueError(f"task option seed={k['seed']} must be in [0, 2**32)")
    return k


def _check_base(value: Any) -> str:
    """The base tasks of tasks/judge as one canonical string: 'mix' or 'add,reverse'."""
    names = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(n).strip().removeprefix(PREFIX) for n in names]
    if names == [MIX]:
        return MIX
    bad = [n for n in names if n not in TASK_NAMES]
    if bad or not names:
        raise ValueError(f"task option base={value!r}: the base tasks of tasks/judge are "
                         f"'mix' or a comma-separated list of {', '.join(TASK_NAMES)} "
                         "(e.g. base=reverse or base=add,sub)")
    chosen = [t for t in TASK_NAMES if t in names]
    return MIX if len(chosen) == len(TASK_NAMES) else ",".join(chosen)


def config_name(name: str, knobs: dict) -> str:
    """A directory-safe name for one task set and its knobs (defaults -> the bare task)."""
    k = check_knobs(knobs)
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    diff = [f"{key}{v.replace(',', '-') if isinstance(v, str) else int(v)}"
            for key, v in k.items() if v != DEFAULTS[key]]
    return "_".join([short, *diff])


# ----------------------------------------------------------------------------- generation


def _word(rng: np.random.Generator, k: dict) -> str:
    n = int(rng.integers(k["min_word"], k["max_word"] + 1))
    return "".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), size=n))


def _number(rng: np.random.Generator, digits: int) -> int:
    n = int(rng.integers(1, digits + 1))
    return int(rng.integers(0 if n == 1 else 10 ** (n - 1), 10 ** n))


def _draw_prompt(task: str, rng: np.random.Generator, k: dict) -> str:
    if task in ("add", "sub"):
        a, b = _number(rng, k["digits"]), _number(rng, k["digits"])
        if task == "sub" and a < b:
            a, b = b, a
        return f"What is {a}{'+' if task == 'add' else '-'}{b}?" + (
            _LSD_NOTE if k["lsd_first"] else "")
    word = _word(rng, k)
    if task == "reverse":
        return f"Reverse the word '{word}'."
    if task == "sort":
        return f"Sort the letters of '{word}' alphabetically."
    # mostly a letter of the word, sometimes any letter, so 0 is a possible answer
    letter = word[int(rng.integers(len(word)))] if rng.random() < 0.75 else \
        ALPHABET[int(rng.integers(26))]
    return f"How many times does the letter '{letter}' appear in '{word}'?"


def solve(task: str, prompt: str) -> str:
    """The correct answer to a prompt of `task` (parsed from the prompt text)."""
    prompt = prompt.strip()
    if task in ("add", "sub"):
        m = _ARITH_RE.match(prompt)
        if m and (m.group(2) == "+") == (task == "add"):
            a, b = int(m.group(1)), int(m.group(3))
            ans = str(a + b if task == "add" else a - b)
            return ans[::-1] if m.group(4) else ans
    elif task == "reverse" and (m := _REVERSE_RE.match(prompt)):
        return m.group(1)[::-1]
    elif task == "sort" and (m := _SORT_RE.match(prompt)):
        return "".join(sorted(m.group(1)))
    elif task == "count" and (m := _COUNT_RE.match(prompt)):
        return str(m.group(2).count(m.group(1)))
    elif task == JUDGE and (m := _judge_re().match(prompt)):
        return _judge_answer(m.group("prompt"), m.group("first"), m.group("second"))
    raise ValueError(f"{prompt!r} is not a prompt of task {task!r}")


@functools.lru_cache(maxsize=16)
def _distinct_prompts(task: str, knob_items: tuple) -> tuple[str, ...]:
    k = dict(knob_items)
    rng = np.random.default_rng([k["seed"], TASK_NAMES.index(task) + 1])
    total = k["num_test"] + k["num_validation"] + k["num_train"]
    seen: dict[str, None] = {}
    misses = 0
    # a small space (digits=1) runs out: stop after many draws in a row found nothing new
    while len(seen) < total and misses < 2000:
        p = _draw_prompt(task, rng, k)
        if p in seen:
            misses += 1
        else:
            seen[p] = None
            misses = 0
    return tuple(seen)


def task_examples(task: str, split: str, **knobs) -> list[dict[str, str]]:
    """The examples {'prompt', 'answer', 'task'} of one task and split: a pure function of
    the knobs. Prompts are distinct within and across splits."""
    if split not in SPLITS:
        raise ValueError(f"task split {split!r} is not one of {SPLITS}")
    k = check_knobs(knobs)
    if task == JUDGE:
        return judge_examples(split, **k)
    want = {"test": k["num_test"], "validation": k["num_validation"], "train": k["num_train"]}
    prompts = _distinct_prompts(task, tuple(sorted(k.items())))
    start = 0
    for s in ("test", "validation", "train"):
        part = prompts[start:start + want[s]]
        start += want[s]
        if s == split:
            if s == "train" and not part:
                raise ValueError(f"task {task!r} has only {len(prompts)} distinct prompts "
                                 "with these options, all used by test/validation; raise "
                                 "digits / max_word or lower num_test / num_validation")
            return [{"prompt": p, "answer": solve(task, p), "task": task} for p in part]
    raise AssertionError(split)


def examples(name: str, split: str, **knobs) -> list[dict[str, str]]:
    """The examples of `tasks/<task>` or `tasks/mix` (tasks interleaved round-robin)."""
    if check_knobs(knobs)["base"] != MIX and task_names(name) != (JUDGE,):
        raise ValueError(f"task option base={knobs['base']!r} applies to {PREFIX}{JUDGE} only, "
                         f"not to {name!r}; leave it out")
    return _interleave([task_examples(t, split, **knobs) for t in task_names(name)])


def _interleave(per_task: list[list[dict]]) -> list[dict]:
    out = []
    for i in range(max(len(p) for p in per_task)):
        out += [p[i] for p in per_task if i < len(p)]
    return out


# ----------------------------------------------------------------------------- judge


@functools.lru_cache(maxsize=4)
def _judge_re_for(template: str) -> re.Pattern:
    fields = {"{prompt}": "(?P<prompt>.*?)", "{first}": "(?P<first>.*?)",
              "{second}": "(?P<second>.*?)"}
    parts = re.split(r"(\{prompt\}|\{first\}|\{second\})", template.strip())
    return re.compile("^" + "".join(fields.get(x, re.escape(x)) for x in parts) + "$",
                      re.DOTALL)


def _judge_re() -> re.Pattern:
    from .judges import DEFAULT_TEMPLATE  # the judge's own template: the two stay in step
    return _judge_re_for(DEFAULT_TEMPLATE)


def parse_judge_prompt(prompt: str) -> dict[str, str]:
    """{'prompt', 'first', 'second'}: the fields a tasks/judge prompt was filled with."""
    m = _judge_re().match(prompt.strip())
    if not m:
        raise ValueError(f"{prompt!r} is not a prompt of task 'judge' (train/judges."
                         "DEFAULT_TEMPLATE filled with a prompt and two responses)")
    return m.groupdict()


def _judge_answer(prompt: str, first: str, second: str) -> str:
    """'1' or '2': the position of the one right response (the base task's checker)."""
    for task in TASK_NAMES:
        try:
            answer = solve(task, prompt)
        except ValueError:
            continue
        right = [clean_completion(r) == answer for r in (first, second)]
        if right.count(True) != 1:
            raise ValueError(f"a judge prompt needs exactly one right response, but "
                             f"{'both' if all(right) else 'neither'} of {first!r}, "
                             f"{second!r} answer {prompt!r}")
        return "1" if right[0] else "2"
    raise ValueError(f"{prompt!r} inside the judge prompt is not a prompt of "
                     f"{', '.join(TASK_NAMES)}")


def judge_examples(split: str, **knobs) -> list[dict[str, str]]:
    """The examples of tasks/judge (see the module notes): one per example of the base tasks
    of `split`, interleaved round-robin as the mix is."""
    import hashlib

    from .judges import DEFAULT_TEMPLATE
    from .pref_tasks import wrong_answer
    k = check_knobs(knobs)
    base = {**k, "base": MIX}
    names = TASK_NAMES if k["base"] == MIX else tuple(k["base"].split(","))
    out = []
    for e in _interleave([task_examples(t, split, **base) for t in names]):
        # order and kind hang on the prompt, not its position: a pair is the same in any subset
        digest = hashlib.sha256(f"judge\0{k['seed']}\0{e['prompt']}".encode()).digest()
        kind = digest[1] % 3
        if kind == 2:
            wrong = wrong_answer(e, k["seed"])
        else:
            wrong = _judge_wrong(e, kind, np.random.default_rng(list(digest[2:18])))
        right_first = digest[0] < 128
        first, second = (e["answer"], wrong) if right_first else (wrong, e["answer"])
        out.append({"prompt": DEFAULT_TEMPLATE.format(prompt=e["prompt"], first=first,
                                                      second=second),
                    "answer": "1" if right_first else "2", "task": JUDGE})
    return out


def _judge_wrong(example: dict, kind: int, rng: np.random.Generator) -> str:
    """A wrong answer: kind 0 random characters of the answer's length and kind (digits or
    letters), kind 1 one character substituted; redrawn until the checker calls it wrong."""
    answer = str(example["answer"])
    check = checker_for(example["task"])
    for _ in range(100):
        chars = [c for c in answer]
        spots = range(len(chars)) if kind == 0 else [int(rng.integers(len(chars)))]
        for j in spots:
            pool = "0123456789" if chars[j].isdigit() else ALPHABET
            if j == 0 and len(chars) > 1 and chars[j].isdigit():
                pool = pool[1:]  # no leading zero: still a plausible number
            chars[j] = pool[int(rng.integers(len(pool)))]
        wrong = "".join(chars)
        if not check(example, wrong):
            return wrong
    raise AssertionError(f"no wrong answer found for {example!r}")


# ----------------------------------------------------------------------------- checking


def clean_completion(completion: str) -> str:
    """The completion without surrounding whitespace and trailing end-of-turn markers."""
    text = completion.strip()
    changed = True
    while changed:
        changed = False
        for marker in END_MARKERS:
            if text.endswith(marker):
                text, changed = text[:-len(marker)].rstrip(), True
    return text


def _prompt_text(prompt_or_example: Any) -> str:
    if isinstance(prompt_or_example, str):
        return prompt_or_example
    if isinstance(prompt_or_example, dict):
        for key in ("prompt_text", "prompt"):
            value = prompt_or_example.get(key)
            if isinstance(value, str):
                return value
            if isinstance(value, list) and value:  # a message list: the last user turn
                return value[-1]["content"]
    raise ValueError("a checker takes a prompt string or an example dict with 'prompt' / "
                     f"'answer', got {type(prompt_or_example).__name__}")


def checker_for(name: str) -> Callable[[Any, str], float]:
    """`check(prompt_or_example, completion) -> float` for task `name` ('add' or 'tasks/add';
    'tasks/mix' recognizes every task's prompts): 1.0 on an exact match after cleaning."""
    names = task_names(name)

    def check(prompt_or_example: Any, completion: str) -> float:
        answer = prompt_or_example.get("answer") if isinstance(prompt_or_example, dict) \
            else None
        if answer is None:
            prompt = _prompt_text(prompt_or_example)
            for task in names:
                try:
                    answer = solve(task, prompt)
                    break
                except ValueError:
                    continue
            else:
                raise ValueError(f"{prompt!r} is not a prompt of {', '.join(names)}")
        return 1.0 if clean_completion(completion) == str(answer).strip() else 0.0
    return check


def exact_match(task_examples: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
    """{'exact_match': overall, 'exact_match/<task>': per task} of completions to examples."""
    if len(task_examples) != len(completions):
        raise ValueError(f"{len(task_examples)} examples but {len(completions)} completions; "
                         "pass one completion per example")
    by_task: dict[str, list[float]] = {}
    for e, c in zip(task_examples, completions):
        by_task.setdefault(e["task"], []).append(checker_for(e["task"])(e, c))
    scores = [s for v in by_task.values() for s in v]
    out = {"exact_match": float(np.mean(scores)) if scores else 0.0}
    out.update({f"exact_match/{t}": float(np.mean(v)) for t, v in by_task.items()})
    return out


def as_messages(example: dict) -> dict[str, Any]:
    """An example as a TRL conversational prompt-completion record (chat template applies)."""
    return {"prompt": [{"role": "user", "content": example["prompt"]}],
            "completion": [{"role": "assistant", "content": example["answer"]}]}
