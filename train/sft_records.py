"""Instruction data records in TRL's JSONL formats: checking, and preparing into ArrayRecord.

Formats (one per file; every line the same, blank lines skipped; other keys ignored):
- "messages":          {"messages": [{"role": "system"|"user"|"assistant", "content": str},
                        ...]} with at least one assistant message;
- "prompt_completion": {"prompt": P, "completion": C}, both strings or both message lists
                        (the completion's messages are assistant turns); C is not empty;
- "text":              {"text": str} (language modelling: every token is labelled).
Any problem -> UserDataError "<file>:<line>: <what is wrong>; <fix>", found while checking
the whole file, before anything is written.

Preparation: a file, or a directory of *.jsonl files (one format for all), becomes the TFDS
ArrayRecord builder `sft_jsonl` whose one feature "example" is the record as JSON text
({"format": ..., fields, "where": "file:line"}); the config name carries a fingerprint of
the absolute paths, sizes and modification times (and RULES_VERSION), so an edited file is
prepared again. Held-out splits: in a directory, files whose name contains 'valid' are the
'validation' split and 'test' the 'test' split; without a validation file, training record
i is 'validation' when i % 100 == 99 (as train/text_data.py), with 2..99 records the last
one is, and a single record has none. The embedded tasks (train/tasks.py) become the
builder `sft_tasks` of conversational prompt-completion records with train / validation /
test splits. TFDS writes into an `incomplete.*` directory renamed when done, so a failure
leaves nothing a later run trusts. Another record format reuses all of this by passing
`rules=` (a module with parse_record, RULES_VERSION, _FIX and builder_classes, whose
builders subclass these): train/pref_records.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
from typing import Any

from fmzoo.train import tasks as tasks_lib
from fmzoo.train.text_data import UserDataError, _lines, split_of

FORMATS = ("messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
RULES_VERSION = "3"
_FIX = ("each line must be one JSON object in one of TRL's formats: {\"messages\": [{\"role\":"
        " ..., \"content\": ...}, ...]}, {\"prompt\": ..., \"completion\": ...} or "
        "{\"text\": ...}")
_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
          float: "a number", bool: "a boolean", type(None): "null"}


def _kind(value) -> str:
    return _TYPES.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- checking


def _messages(value, where: str, key: str, *, need_assistant: bool, only_assistant=False):
    if not isinstance(value, list) or not value:
        raise UserDataError(f"{where}: \"{key}\" is {_kind(value)}"
                            f"{' (empty)' if value == [] else ''}, not a non-empty list of "
                            "messages; " + _FIX)
    out = []
    for j, m in enumerate(value):
        at = f"{where}: \"{key}\"[{j}]"
        if not isinstance(m, dict):
            raise UserDataError(f"{at} is {_kind(m)}, not a message object with \"role\" and "
                                "\"content\"")
        for field in ("role", "content"):
            if field not in m:
                raise UserDataError(f"{at} has no \"{field}\" (keys: {sorted(m)[:10]}); every "
                                    "message needs \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise UserDataError(f"{at}: unknown role {m['role']!r}; use one of "
                                f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserDataError(f"{at}: \"content\" is {_kind(m['content'])}, not a string "
                                "(multimodal content lists are not supported)")
        if only_assistant and m["role"] != "assistant":
            raise UserDataError(f"{at}: a completion message has role {m['role']!r}; "
                                "completion messages must be assistant turns")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserDataError(f"{where}: no assistant message, so nothing would be learned; "
                            "add the assistant's reply")
    return out


def parse_record(record: Any, where: str) -> dict:
    """The normalized record {"format": ..., fields} of one JSON value; `where` = file:line."""
    if not isinstance(record, dict):
        raise UserDataError(f"{where}: {_kind(record)}, not a JSON object; {_FIX}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise UserDataError(f"{where}: has both \"messages\" and \"prompt\"/\"completion\""
                                "; use one format per line")
        return {"format": "messages",
                "messages": _messages(record["messages"], where, "messages",
                                      need_assistant=True)}
    if "chosen" in record or "rejected" in record:
        raise UserDataError(f"{where}: a preference record (\"chosen\"/\"rejected\"), which "
                            "`fmzoo reward` and `fmzoo dpo` read; for SFT, " + _FIX)
    if "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if k not in record]
        if missing:
            raise UserDataError(f"{where}: no \"{missing[0]}\" field; a prompt-completion "
                                "record needs both \"prompt\" and \"completion\"")
        p, c = record["prompt"], record["completion"]
        if isinstance(p, str) and isinstance(c, str):
            if not c:
                raise UserDataError(f"{where}: empty completion; give the text to learn")
            return {"format": "prompt_completion", "prompt": p, "completion": c}
        if isinstance(p, list) and isinstance(c, list):
            if not c or all(isinstance(m, dict) and m.get("content") == "" for m in c):
                raise UserDataError(f"{where}: empty completion; give the reply to learn")
            return {"format": "prompt_completion",
                    "prompt": _messages(p, where, "prompt", need_assistant=False),
                    "completion": _messages(c, where, "completion", need_assistant=False,
                                            only_assistant=True)}
        raise UserDataError(f"{where}: \"prompt\" is {_kind(p)} and \"completion\" is "
                            f"{_kind(c)}; both must be strings or both lists of messages")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise UserDataError(f"{where}: \"text\" is {_kind(record['text'])}, not a string")
        if not record["text"]:
            raise UserDataError(f"{where}: empty \"text\"; remove the line")
        return {"format": "text", "text": record["text"]}
    raise UserDataError(f"{where}: none of the keys \"messages\", \"prompt\"/\"completion\", "
                        f"\"text\" (keys: {sorted(record)[:10]}); {_FIX}")


def _rules(rules):
    """The record rules: this module (SFT), or another with the same names (parse_record,
    RULES_VERSION, _FIX, builder_classes), e.g. train/pref_records.py."""
    return sys.modules[__name__] if rules is None else rules


def read_records(path: str, rules=None):
    """(line number, normalized record) of every non-blank line; one format per file."""
    rules = _rules(rules)
    first = None
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"{rules._FIX}") from None
        rec = rules.parse_record(value, where)
        if first is None:
            first = (rec["format"], number)
        elif rec["format"] != first[0]:
            raise UserDataError(f"{where}: a {rec['format']} record, but line {first[1]} is "
                                f"{first[0]}; use one format per file (split the file)")
        yield number, rec


def check_file(path: str, rules=None) -> tuple[str, int]:
    """(format, number of records) after checking every line; raises on the first problem."""
    fmt, n = None, 0
    for _, rec in read_records(path, rules):
        fmt, n = rec["format"], n + 1
    if n == 0:
        raise UserDataError(f"{path}: no records (the file is empty or blank); "
                            f"{_rules(rules)._FIX}")
    return fmt, n


def jsonl_path(name: str) -> str:
    """The absolute path of a JSONL file or of a directory of JSONL files."""
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.exists(path):
        raise FileNotFoundError(f"instruction data {name!r} does not exist; --data takes a "
                                "JSONL file in TRL's formats, a directory of them, or an "
                                f"embedded task ({', '.join(tasks_lib.embedded_names())})")
    if not os.path.isdir(path) and not (os.path.isfile(path) and
                                        path.lower().endswith(".jsonl")):
        raise UserDataError(f"instruction data {name!r} is not a .jsonl file; give one JSONL "
                            "file (one JSON object a line) in TRL's formats, or a directory "
                            "of them")
    return path


def split_files(path: str) -> dict[str, list[str]]:
    """{split: files}: a file is 'train'; in a directory (not recursive, hidden files
    skipped) a *.jsonl whose name contains 'valid' or 'test' is that split, any other one
    is train."""
    if os.path.isfile(path):
        return {"train": [path]}
    out: dict[str, list[str]] = {}
    for n in sorted(os.listdir(path)):
        f = os.path.join(path, n)
        if n.startswith(".") or not n.lower().endswith(".jsonl") or not os.path.isfile(f):
            continue
        split = ("validation" if "valid" in n.lower() else
                 "test" if "test" in n.lower() else "train")
        out.setdefault(split, []).append(f)
    if "train" not in out:
        raise UserDataError(f"directory {path!r} holds no training *.jsonl file (files whose "
                            "name contains 'valid' or 'test' are held out); add one, e.g. "
                            "train.jsonl")
    return out


def fingerprint(path: str, rules=None) -> str:
    h = hashlib.sha256(f"{_rules(rules).RULES_VERSION}\n{path}\n".encode())
    for split, files in sorted(split_files(path).items()):
        for f in files:
            st = os.stat(f)
            h.update(f"{split}\t{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def check_data(path: str, rules=None) -> tuple[str, int]:
    """(format, training records) after checking every file; the first problem raises."""
    first, n_train = None, 0
    for split, files in split_files(path).items():
        for f in files:
            fmt, n = check_file(f, rules)
            if first is None:
                first = (fmt, f)
            elif fmt != first[0]:
                raise UserDataError(f"{f} is in the {fmt} format but {first[1]} is {first[0]};"
                                    " use one format for all files of a dataset")
            n_train += n if split == "train" else 0
    return first[0], n_train


def _split_records(path: str, split: str, num_train: int, rules=None):
    """(index, record with "where" = file:line) of one split, in file and line order."""
    files = split_files(path)
    held_out_files = "validation" in files
    i = t = 0  # record key over all files; index among the training files' records
    for f_split, group in files.items():
        for f in group:
            for number, rec in read_records(f, rules):
                rec = {**rec, "where": f"{f}:{number}"}
                if f_split == "train":
                    f_split_of = "train" if held_out_files else split_of(t, num_train)
                    t += 1
                else:
                    f_split_of = f_split
                if f_split_of == split:
                    yield i, rec
                i += 1


# ----------------------------------------------------------------------------- TFDS builders


_CLASSES: dict = {}
_CLASSES_LOCK = threading.Lock()


def builder_classes():
    with _CLASSES_LOCK:
        if not _CLASSES:
            _CLASSES.update(_define_builders())
        return _CLASSES


def _define_builders():
    import tensorflow_datasets as tfds

    features = lambda: tfds.features.FeaturesDict({"example": tfds.features.Text()})  # noqa

    @dataclasses.dataclass(eq=False)
    class SftJsonlConfig(tfds.core.BuilderConfig):
        path: str = ""
        fingerprint: str = ""
        num_records: int = 0
        record_format: str = ""

    class SftJsonl(tfds.core.GeneratorBasedBuilder):
        """Instruction data from a JSONL file in TRL's formats (records as JSON text)."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # no checksums file to look up (see train/datasets.py)
        RULES = None  # the record rules (_rules); a subclass reads another format

        def _info(self):
            c = self.builder_config
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__, features=features(),
                metadata=tfds.core.MetadataDict(source=c.path, fingerprint=c.fingerprint,
                                                format=c.record_format,
                                                rules_version=_rules(self.RULES).RULES_VERSION))

        def _split_generators(self, dl_manager):
            del dl_manager
            c = self.builder_config
            splits = set(split_files(c.path)) | {"train"}
            if c.num_records >= 2:
                splits.add("validation")
            return {s: self._generate_examples(s) for s in sorted(splits)}

        def _generate_examples(self, split):
            c = self.builder_config
            if fingerprint(c.path, self.RULES) != c.fingerprint:
                raise UserDataError(f"{c.path} changed while being prepared; run again once "
                                    "it is written")
            for i, rec in _split_records(c.path, split, c.num_records, self.RULES):
                yield i, {"example": json.dumps(rec)}

    @dataclasses.dataclass(eq=False)
    class SftTasksConfig(tfds.core.BuilderConfig):
        task: str = "tasks/mix"
        knobs: str = "{}"  # JSON, so the config stays a plain dataclass

    class SftTasks(tfds.core.GeneratorBasedBuilder):
        """Embedded verifiable instruction tasks (train/tasks.py) as chat records."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            c = self.builder_config
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__, features=features(),
                metadata=tfds.core.MetadataDict(task=c.task, format="prompt_completion",
                                                **json.loads(c.knobs)))

        def _split_generators(self, dl_manager):
            del dl_manager
            k = json.loads(self.builder_config.knobs)
            # TFDS refuses an empty split: num_validation=0 / num_test=0 means no such split
            return {s: self._generate_examples(s) for s in tasks_lib.SPLITS
                    if s == "train" or k[f"num_{s}"] > 0}

        def _generate_examples(self, split):
            c = self.builder_config
            for i, ex in enumerate(tasks_lib.examples(c.task, split, **json.loads(c.knobs))):
                rec = {"format": "prompt_completion", **tasks_lib.as_messages(ex),
                       "answer": ex["answer"], "task": ex["task"]}
                yield i, {"example": json.dumps(rec)}

    return {"jsonl": (SftJsonl, SftJsonlConfig), "tasks": (SftTasks, SftTasksConfig)}


def _slug(path: str) -> str:
    base = os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0].lower()
    return re.sub(r"[^a-z0-9]+", "_", base).strip("_")[:40] or "data"


def jsonl_builder(path: str, data_dir: str, num_records: int = 0, record_format: str = "",
                  rules=None):
    cls, cfg_cls = _rules(rules).builder_classes()["jsonl"]
    fp = fingerprint(path, rules)
    config = cfg_cls(name=f"{_slug(path)}_{fp[:16]}", path=path, fingerprint=fp,
                     num_records=num_records, record_format=record_format,
                     description=f"instruction data {path}")
    return cls(config=config, data_dir=data_dir, file_format="array_record")


def tasks_builder(name: str, data_dir: str, *, rules=None, **knobs):
    cls, cfg_cls = _rules(rules).builder_classes()["tasks"]
    k = tasks_lib.check_knobs(knobs)
    tasks_lib.task_names(name)
    config = cfg_cls(name=tasks_lib.config_name(name, k), task=name,
                     knobs=json.dumps(k, sort_keys=True), description=f"{name} {k}")
    return cls(config=config, data_dir=data_dir, file_format="array_record")


def _build(builder, make, data_dir: str):
    """Prepares `builder` once under a file lock; `make()` rebuilds it inside the lock."""
    from fmzoo.train.datasets import _file_lock
    if builder.is_prepared():
        return builder
    name = builder.builder_config.name
    with _file_lock(os.path.join(data_dir, ".fmzoo_locks", f"{builder.name}-{name}.lock")):
        builder = make()
        if builder.builder_config.name != name:
            raise UserDataError("the data changed while being checked; run again once it is "
                                "written")
        if not builder.is_prepared():
            config_dir = os.path.join(data_dir, builder.name, name)
            try:
                builder.download_and_prepare(file_format="array_record")
            except BaseException:
                # TFDS removed its incomplete.* dir; drop the empty folders it leaves
                for d in (config_dir, os.path.dirname(config_dir)):
                    if os.path.isdir(d) and not os.listdir(d):
                        os.rmdir(d)
                raise
    return builder


def prepare(name: str, data_dir: str, *, rules=None, **options):
    """The prepared builder of an embedded task name or a JSONL path (read by `rules`)."""
    if tasks_lib.is_task_name(name):
        make = lambda: tasks_builder(name, data_dir, rules=rules, **options)  # noqa: E731
        return _build(make(), make, data_dir)
    if options:
        raise ValueError(f"options {sorted(options)} apply to the embedded tasks only, not "
                         f"to {name!r}")
    path = jsonl_path(name)
    builder = jsonl_builder(path, data_dir, rules=rules)
    if builder.is_prepared():
        return builder
    fmt, n = check_data(path, rules)  # every error before any write
    return _build(builder, lambda: jsonl_builder(path, data_dir, n, fmt, rules), data_dir)
