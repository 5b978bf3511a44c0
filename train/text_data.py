"""User data as an LM dataset: a text file, a directory of text files, or JSONL.

`prepare_user_text(path, data_dir)` turns the user's file(s) into a TFDS ArrayRecord dataset
in data_dir (builder `user_text`), read like every other dataset with `as_data_source` +
grain. It is prepared once: the config name carries a fingerprint of the absolute path and
every file's relative path, size and modification time (plus RULES_VERSION), so an edited,
added or removed file gives a new variant that is prepared again; the superseded variant of
the same path is deleted once the new one is complete.

What is read:
- a file ending in .jsonl: one JSON object per line with a string "text" field; each record is
  one document (blank lines and empty texts are skipped);
- a file ending in .json is refused (one JSON document is not a corpus; use JSONL);
- any other file: UTF-8 text (a leading BOM is dropped), cut into documents of whole lines:
  a document ends at the first blank line after CHUNK_SOFT characters, or at the first line
  end after CHUNK_HARD characters (so a 1 MB file gives a few hundred documents, and a small
  file is one document). Each document becomes bos + text + eos in lm_batches;
- a directory: every regular file below it (recursively, in sorted path order) whose suffix
  is in TEXT_SUFFIXES (read as text) or .jsonl (read as JSONL); hidden files and folders
  (name starts with '.') are skipped, and so are empty files.

Held-out split: document i (counted over all files in order) is 'validation' when
i % VALIDATION_EVERY == VALIDATION_EVERY - 1; with 2..VALIDATION_EVERY - 1 documents the last
one is. A single document has no validation split (training works; evaluation is skipped).

Errors, one line each, raised while checking the files and before anything is written:
missing path, no files / no text, bytes that are not UTF-8 (file, line and byte offset), a
JSONL line that is not a JSON object with a string "text" field (file and line number).
TFDS writes into an `incomplete.*` directory and renames it when done, so a failure leaves
nothing behind that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".markdown")
JSONL_SUFFIX = ".jsonl"
ALL_SUFFIXES = (*TEXT_SUFFIXES, JSONL_SUFFIX)
CHUNK_SOFT = 2048
CHUNK_HARD = 8192
VALIDATION_EVERY = 100
RULES_VERSION = "1"  # bump when the document or split rules change: it is fingerprinted
BUILDER_NAME = "user_text"
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


class UserDataError(ValueError):
    """User data that cannot be read as text; the message names the file and the fix."""


# ----------------------------------------------------------------------------- files


def user_files(path: str) -> tuple[str, list[str]]:
    """(absolute root, sorted absolute paths of the files to read) for a file or directory."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(root):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if os.path.isfile(root):
        if root.lower().endswith(".json"):
            raise UserDataError(
                f"data file {path!r} is .json; fmzoo reads JSON Lines (one object with a "
                "\"text\" field per line) from *.jsonl files: rename it if it is JSON Lines, "
                "else convert it")
        return root, [root]
    if not os.path.isdir(root):
        raise UserDataError(f"data path {path!r} is neither a regular file nor a directory")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(folder, n) for n in names
                  if not n.startswith(".") and n.lower().endswith(ALL_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, n))]
    files.sort(key=lambda f: os.path.relpath(f, root))
    if not files:
        raise UserDataError(
            f"data directory {path!r} holds no {', '.join('*' + s for s in ALL_SUFFIXES)} "
            "files (searched recursively, hidden entries skipped); add text files or point "
            "--data at a file")
    return root, files


def fingerprint(root: str, files: list[str]) -> str:
    """Changes when any file is edited, added, removed or renamed (stat only, no reading)."""
    h = hashlib.sha256(f"{RULES_VERSION}\n{root}\n".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def config_name(root: str, fp: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:40]
    return f"{slug or 'data'}_{fp[:16]}"


# ----------------------------------------------------------------------------- documents


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a file; a UserDataError names the first bad byte."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserDataError(
                    f"{path}: line {number} (byte offset {offset + e.start}) is not UTF-8 "
                    f"({e.reason}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8, "
                    "or remove it from --data") from None
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            offset += len(raw)
            yield number, line


def _text_documents(path: str) -> Iterator[str]:
    chunk, size = [], 0
    for _, line in _lines(path):
        chunk.append(line)
        size += len(line)
        if (size >= CHUNK_SOFT and not line.strip()) or size >= CHUNK_HARD:
            text = "".join(chunk)
            if text.strip():
                yield text
            chunk, size = [], 0
    text = "".join(chunk)
    if text.strip():
        yield text


def _jsonl_documents(path: str) -> Iterator[str]:
    fix = 'each line must be one JSON object with a string "text" field'
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserDataError(f"{path}:{number}: not valid JSON ({e.msg} at column "
                                f"{e.colno}); {fix}") from None
        if not isinstance(record, dict):
            raise UserDataError(f"{path}:{number}: a JSON {_JSON_TYPES.get(type(record))}, "
                                f"not an object; {fix}")
        if "text" not in record:
            raise UserDataError(f"{path}:{number}: no \"text\" field (keys: "
                                f"{sorted(record)[:10]}); {fix}")
        text = record["text"]
        if not isinstance(text, str):
            raise UserDataError(f"{path}:{number}: \"text\" is a JSON "
                                f"{_JSON_TYPES.get(type(text), type(text).__name__)}, not a "
                                f"string; {fix}")
        if text:
            yield text


def documents(files: list[str], progress=None) -> Iterator[str]:
    """Every document of the files, in order; `progress(n_bytes)` after each file."""
    for f in files:
        yield from (_jsonl_documents if f.lower().endswith(JSONL_SUFFIX)
                    else _text_documents)(f)
        if progress is not None:
            progress(os.path.getsize(f))


def count_documents(path: str, files: list[str], show_progress: bool = True) -> int:
    """Reads every file once (checking it) and counts documents; raises if there is no text."""
    from tqdm.auto import tqdm
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"checking {path}",
              disable=not show_progress, leave=False) as bar:
        n = sum(1 for _ in documents(files, progress=bar.update))
    if n == 0:
        what = ("the file holds no text" if len(files) == 1 else
                f"none of its {len(files)} files holds any text")
        raise UserDataError(f"data path {path!r} is empty: {what} (only whitespace, or JSONL "
                            "without a non-empty \"text\"); add text to it")
    return n


def split_of(index: int, num_docs: int) -> str:
    if num_docs < 2:
        return "train"
    if num_docs < VALIDATION_EVERY:
        return "validation" if index == num_docs - 1 else "train"
    return "validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"


# ----------------------------------------------------------------------------- TFDS builder


_CLASSES: dict = {}
_CLASSES_LOCK = threading.Lock()


def builder_classes():
    """(builder class, config class), defined once per process (TFDS registers by name)."""
    with _CLASSES_LOCK:
        if not _CLASSES:
            _CLASSES["user_text"] = _define_builder()
        return _CLASSES["user_text"]


def _define_builder():
    import tensorflow_datasets as tfds

    @dataclasses.dataclass(eq=False)
    class UserTextConfig(tfds.core.BuilderConfig):
        path: str = ""  # absolute file or directory
        fingerprint: str = ""
        num_docs: int = 0  # known after checking; only needed to write

    class UserText(tfds.core.GeneratorBasedBuilder):
        """The user's own text (LM): a text file, a directory of text files, or JSONL."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # no checksums file to look up (see train/datasets.py)

        def _info(self):
            c = self.builder_config
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__,
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                metadata=tfds.core.MetadataDict(
                    source=c.path, fingerprint=c.fingerprint, rules_version=RULES_VERSION,
                    validation_rule=f"document % {VALIDATION_EVERY} == "
                                    f"{VALIDATION_EVERY - 1} (else the last of >= 2)"))

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing is downloaded
            n = self.builder_config.num_docs
            splits = ("train", "validation") if n >= 2 else ("train",)
            return {s: self._generate_examples(s) for s in splits}

        def _generate_examples(self, split):
            c = self.builder_config
            root, files = user_files(c.path)
            if fingerprint(root, files) != c.fingerprint:
                raise UserDataError(f"data path {c.path!r} changed while being prepared; "
                                    "run again once it is written")
            for i, text in enumerate(documents(files)):
                if split_of(i, c.num_docs) == split:
                    yield i, {"text": text}

    return UserText, UserTextConfig


def user_builder(path: str, data_dir: str, num_docs: int = 0):
    """The (not necessarily prepared) builder of the current contents of `path`."""
    cls, cfg_cls = builder_classes()
    root, files = user_files(path)
    fp = fingerprint(root, files)
    config = cfg_cls(name=config_name(root, fp), path=root, fingerprint=fp,
                     num_docs=num_docs, description=f"user data {root}")
    return cls(config=config, data_dir=data_dir, file_format="array_record"), files


def prepare_user_text(path: str, data_dir: str, show_progress: bool = True):
    """The prepared builder of `path`: checked and written on first use or after a change."""
    from fmzoo.train.datasets import _file_lock
    builder, files = user_builder(path, data_dir)
    if builder.is_prepared():
        return builder
    num_docs = count_documents(path, files, show_progress)  # every error before any write
    name = builder.builder_config.name
    with _file_lock(os.path.join(data_dir, ".fmzoo_locks", f"{BUILDER_NAME}-{name}.lock")):
        builder, _ = user_builder(path, data_dir, num_docs)
        if builder.builder_config.name != name:
            raise UserDataError(f"data path {path!r} changed while being checked; run again "
                                "once it is written")
        if not builder.is_prepared():
            config_dir = os.path.join(data_dir, BUILDER_NAME, name)
            try:
                builder.download_and_prepare(file_format="array_record")
            except BaseException:
                # TFDS removed its incomplete.* dir; drop the empty config dir it leaves
                if os.path.isdir(config_dir) and not os.listdir(config_dir):
                    os.rmdir(config_dir)
                raise
            _drop_superseded(data_dir, name, builder.builder_config.path)
    return builder


def _drop_superseded(data_dir: str, current: str, source: str) -> None:
    """Deletes older variants of the same source path, so edits do not pile up copies."""
    base = os.path.join(data_dir, BUILDER_NAME)
    prefix = current.rsplit("_", 1)[0] + "_"
    for other in os.listdir(base):
        if other == current or not other.startswith(prefix):
            continue
        for version in os.listdir(os.path.join(base, other)):
            meta = os.path.join(base, other, version, "metadata.json")
            try:
                with open(meta) as f:
                    if json.load(f).get("source") != source:
                        break
            except (OSError, ValueError):
                break
        else:
            shutil.rmtree(os.path.join(base, other), ignore_errors=True)
