"""Prompts for online RL and for labelling (fmzoo grpo / ppo / label), in TRL's prompt-only
format.

A prompt set is an embedded task (`tasks/add`, `tasks/mix`, ...: its prompts with the
`answer` and `task` columns the checker reward reads) or JSONL in TRL's prompt-only format,
one object a line:

    {"prompt": "What is 2+2?", "answer": "4"}                       standard
    {"prompt": [{"role": "user", "content": "What is 2+2?"}]}       conversational

Every other key is an extra column handed to the reward functions per row (TRL passes the
dataset's columns as keyword arguments). Prompt-completion records are accepted too: their
completion becomes the `answer` column. A directory of *.jsonl splits them as SFT data does
(names holding 'valid' -> validation, 'test' -> test).

A prompt's ids are exactly those the model saw before its reply in SFT: a string prompt is
BOS + its text, a conversation is the chat template with the generation prompt. Prompt sets
are small, so they are read whole into memory (no TFDS preparation).
"""

from __future__ import annotations

import sys
from typing import Any

from . import tasks as tasks_lib
from .text_data import UserDataError

_FIX = ('each line must be one JSON object with a "prompt": a string or a list of '
        '{"role", "content"} messages, e.g. {"prompt": "What is 2+2?", "answer": "4"}')


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    """The ids the model reads before its reply: BOS + text, or the chat template with the
    generation prompt (as models/chat.encode_prompt_completion makes the prompt part)."""
    from fmzoo.models import chat
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None))
    return list(chat.apply_chat_template(tokenizer, prompt, add_generation_prompt=True))


def _last_user(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _parse(value: Any, where: str) -> tuple[Any, dict]:
    if not isinstance(value, dict):
        raise UserDataError(f"{where}: not a JSON object; {_FIX}")
    if "prompt" not in value:
        if "messages" in value:
            raise UserDataError(f"{where}: a \"messages\" record; online RL needs prompts "
                                "only: write {\"prompt\": [messages before the reply]}")
        raise UserDataError(f"{where}: no \"prompt\" field; {_FIX}")
    prompt, columns = value["prompt"], {k: v for k, v in value.items() if k != "prompt"}
    if isinstance(prompt, list):
        bad = [m for m in prompt if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str))]
        if bad or not prompt:
            raise UserDataError(f"{where}: the prompt must be a non-empty list of "
                                "{\"role\": str, \"content\": str} messages")
    elif not isinstance(prompt, str) or not prompt:
        raise UserDataError(f"{where}: the prompt must be a non-empty string or a list of "
                            "messages")
    if "completion" in columns and "answer" not in columns:
        c = columns.pop("completion")
        columns["answer"] = c if isinstance(c, str) else "".join(
            m.get("content", "") for m in c if isinstance(m, dict))
    return prompt, columns


def parse_record(value: Any, where: str) -> dict:
    """One JSONL line -> {"format": "prompt", "prompt", "columns"} (sft_records' rules
    interface, so its reader checks the lines)."""
    prompt, cols = _parse(value, where)
    return {"format": "prompt", "prompt": prompt, "columns": cols}


def _read_jsonl(files: list[str]) -> list[tuple[Any, dict]]:
    from .sft_records import read_records
    rules = sys.modules[__name__]
    return [(rec["prompt"], rec["columns"]) for path in files
            for _, rec in read_records(path, rules)]


def _records(name: str, split: str, options: dict) -> list[tuple[Any, dict]]:
    if tasks_lib.is_task_name(name):
        return [([{"role": "user", "content": e["prompt"]}],
                 {"answer": e["answer"], "task": e["task"]})
                for e in tasks_lib.examples(name, split, **options)]
    if options:
        raise UserDataError(f"options {sorted(options)} apply to embedded tasks only, not to "
                            f"the file {name!r}")
    from .sft_records import jsonl_path, split_files
    files = split_files(jsonl_path(name))
    if split not in files:
        raise UserDataError(f"prompt data {name!r} has no {split!r} split (files: "
                            f"{sorted(files)}); add a file whose name contains "
                            f"'{split[:5]}'")
    return _read_jsonl(files[split])


def load_prompts(name: str, tokenizer, *, split: str = "train", limit: int | None = None,
                 **options) -> list[dict[str, Any]]:
    """The prompts of `split`: dicts {prompt_ids, prompt, prompt_text, columns} (see the
    module notes). `limit`: the first n. Raises UserDataError naming the file and line."""
    records = _records(name, split, options)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise UserDataError(f"prompt data {name!r} split {split!r} holds no prompts; {_FIX}")
    keys = set(records[0][1])
    for i, (_, cols) in enumerate(records):
        if set(cols) != keys:  # reward functions get one list per column
            raise UserDataError(f"prompt data {name!r} record {i} has columns {sorted(cols)} "
                                f"but record 0 has {sorted(keys)}; give every record the same "
                                "extra keys")
    return [{"prompt_ids": prompt_ids(tokenizer, p), "prompt": p,
             "prompt_text": _last_user(p), "columns": cols} for p, cols in records]


def eval_split(name: str, **options) -> str | None:
    """The held-out split: 'validation' for embedded tasks (when they have one) and for a
    directory with a validation file; None otherwise."""
    if tasks_lib.is_task_name(name):
        return "validation" if tasks_lib.check_knobs(options)["num_validation"] else None
    from .sft_records import jsonl_path, split_files
    return "validation" if "validation" in split_files(jsonl_path(name)) else None


def columns(prompts: list[dict]) -> dict[str, list]:
    """The extra columns as {key: one value per prompt} (TRL's reward-function kwargs)."""
    keys = prompts[0]["columns"] if prompts else {}
    return {k: [p["columns"][k] for p in prompts] for k in keys}
