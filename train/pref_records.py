"""Preference records in TRL's JSONL format: checking, and preparing into ArrayRecord.

One JSON object a line (blank lines skipped; other keys ignored):
- explicit prompt: {"prompt": P, "chosen": C, "rejected": R} with all three strings, or all
  message lists: P = {"role", "content"} messages ending with a user turn, C and R lists of
  assistant messages;
- implicit prompt: {"chosen": C, "rejected": R} as two whole conversations (message lists)
  or two strings that share a prefix. The prompt is extracted as TRL's `extract_prompt`
  does: the longest common prefix (for message lists, backed up to end before the final
  assistant reply; for strings, a space just before the first difference goes with the
  responses);
- an optional numeric "margin" (null = none) for a margin loss.
chosen == rejected is allowed; an empty response is not. Any problem -> UserDataError
"<file>:<line>: <what is wrong>; <fix>", found while checking the whole file, before
anything is written. Normalized record: {"format": "preference", "prompt", "chosen",
"rejected"[, "margin"]}.

Preparation reuses train/sft_records.py with this module as its `rules`: a file or a
directory of *.jsonl files becomes the TFDS ArrayRecord builder `pref_jsonl` (fingerprinted
config name; held-out split: every 100th record, or files named *valid* / *test*), the
embedded tasks (train/pref_tasks.py) the builder `pref_tasks` with train / validation /
test splits. Bump RULES_VERSION when the rules below change (it is fingerprinted).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import threading
from typing import Any

from fmzoo.train import sft_records as sft
from fmzoo.train.text_data import UserDataError

FORMAT = "preference"
RULES_VERSION = "1"
_FIX = ("each line must be one JSON object in TRL's preference format: {\"prompt\": ..., "
        "\"chosen\": ..., \"rejected\": ...} (strings, or message lists with assistant "
        "replies), or {\"chosen\": ..., \"rejected\": ...} as two conversations sharing "
        "their prompt")
_kind = sft._kind


def _responses(value, where: str, key: str):
    """A response that is not empty: a string, or assistant messages."""
    if isinstance(value, list) and value:
        value = sft._messages(value, where, key, need_assistant=False, only_assistant=True)
    if not value or isinstance(value, list) and all(m["content"] == "" for m in value):
        raise UserDataError(f"{where}: empty \"{key}\" response; give the reply text")
    return value


def _check_prompt(prompt: list[dict], where: str) -> list[dict]:
    if prompt[-1]["role"] != "user":
        raise UserDataError(f"{where}: the prompt ends with a {prompt[-1]['role']} message; a "
                            "preference prompt ends with the user turn that chosen and "
                            "rejected answer")
    return prompt


def _margin(record: dict, where: str) -> float | None:
    m = record.get("margin")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise UserDataError(f"{where}: \"margin\" is {_kind(m)} {m!r:.40}, not a finite number;"
                            " give a number or leave the key out")
    return float(m)


def extract_prompt(chosen, rejected, where: str = "record"):
    """(prompt, chosen response, rejected response) of the implicit-prompt form, as TRL's
    `extract_prompt`: two strings, or two message lists."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen == rejected:
            raise UserDataError(f"{where}: \"chosen\" and \"rejected\" are the same text, so "
                                "the prompt cannot be told from the responses; give the "
                                "\"prompt\" explicitly")
        n = len(os.path.commonprefix([chosen, rejected]))
        if n and chosen[n - 1] == " ":  # TRL: the space before the difference opens the reply
            n -= 1
        if not n:
            raise UserDataError(f"{where}: \"chosen\" and \"rejected\" share no prompt (they "
                                "differ from the first character); give the \"prompt\" "
                                "explicitly")
        return (chosen[:n], _responses(chosen[n:], where, "chosen"),
                _responses(rejected[n:], where, "rejected"))
    if isinstance(chosen, list) and isinstance(rejected, list):
        c = sft._messages(chosen, where, "chosen", need_assistant=True)
        r = sft._messages(rejected, where, "rejected", need_assistant=True)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        while n and c[n - 1]["role"] == "assistant":  # the prompt ends before the reply
            n -= 1
        if not n:
            raise UserDataError(f"{where}: \"chosen\" and \"rejected\" share no prompt (they "
                                "differ from their first message, or open with the assistant)"
                                "; give the \"prompt\" explicitly")
        for key, conv in (("chosen", c), ("rejected", r)):
            turn = next((j for j in range(n, len(conv)) if conv[j]["role"] != "assistant"),
                        None)
            if turn is not None:
                raise UserDataError(f"{where}: the conversations differ before \"{key}\"[{turn}]"
                                    f" ({conv[turn]['role']}); the implicit form needs the "
                                    "same conversation up to the final assistant reply")
        return (_check_prompt(c[:n], where), _responses(c[n:], where, "chosen"),
                _responses(r[n:], where, "rejected"))
    raise UserDataError(f"{where}: \"chosen\" is {_kind(chosen)} and \"rejected\" is "
                        f"{_kind(rejected)}; both must be strings or both lists of messages")


def parse_record(record: Any, where: str) -> dict:
    """The normalized record of one JSON value (see the module docstring); where = file:line."""
    if not isinstance(record, dict):
        raise UserDataError(f"{where}: {_kind(record)}, not a JSON object; {_FIX}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        sft_like = any(k in record for k in ("messages", "completion", "text"))
        raise UserDataError(f"{where}: no \"{missing[0]}\" field (keys: {sorted(record)[:10]})"
                            + ("; this looks like instruction (SFT) data, which `fmzoo sft` "
                               "reads" if sft_like else "") + f"; {_FIX}")
    c, r = record["chosen"], record["rejected"]
    if "prompt" not in record:
        p, c, r = extract_prompt(c, r, where)
    elif any(all(isinstance(x, t) for x in (record["prompt"], c, r)) for t in (str, list)):
        p = record["prompt"]
        if isinstance(p, list):
            p = _check_prompt(sft._messages(p, where, "prompt", need_assistant=False), where)
        c, r = _responses(c, where, "chosen"), _responses(r, where, "rejected")
    else:
        raise UserDataError(f"{where}: \"prompt\" is {_kind(record['prompt'])}, \"chosen\" "
                            f"{_kind(c)} and \"rejected\" {_kind(r)}; all three must be "
                            "strings or all lists of messages")
    out = {"format": FORMAT, "prompt": p, "chosen": c, "rejected": r}
    margin = _margin(record, where)
    return out if margin is None else {**out, "margin": margin}


def check_data(path: str) -> int:
    """The number of training records after checking every file; the first problem raises."""
    return sft.check_data(path, sys.modules[__name__])[1]


# ----------------------------------------------------------------------------- TFDS builders


_LOCK = threading.Lock()  # TFDS refuses to register a builder name twice


def builder_classes():
    with _LOCK:
        return _define_builders()


@functools.lru_cache(maxsize=1)
def _define_builders():
    import tensorflow_datasets as tfds

    from fmzoo.train import pref_tasks
    (sft_jsonl, jsonl_config), (sft_tasks, tasks_config) = (
        sft.builder_classes()[k] for k in ("jsonl", "tasks"))

    class PrefJsonl(sft_jsonl):
        """Preference pairs from a JSONL file in TRL's format (records as JSON text)."""

        RULES = sys.modules[__name__]

    class PrefTasks(sft_tasks):
        """Embedded verifiable tasks as preference pairs (train/pref_tasks.py)."""

        VERSION = tfds.core.Version(f"1.{RULES_VERSION}.0")  # new rules: prepared again

        def _info(self):
            info = super()._info()
            info.metadata.update(format=FORMAT, rules_version=RULES_VERSION)
            return info

        def _generate_examples(self, split):
            c = self.builder_config
            for i, rec in enumerate(pref_tasks.examples(c.task, split, **json.loads(c.knobs))):
                yield i, {"example": json.dumps({"format": FORMAT, **rec})}

    return {"jsonl": (PrefJsonl, jsonl_config), "tasks": (PrefTasks, tasks_config)}


def prepare(name: str, data_dir: str, **options):
    """The prepared builder (pref_tasks / pref_jsonl) of an embedded task or a JSONL path."""
    return sft.prepare(name, data_dir, rules=sys.modules[__name__], **options)
