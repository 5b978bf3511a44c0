"""Supervised-finetuning data: TRL's JSONL formats or embedded tasks -> labelled LM batches.

`--data` is an embedded task (`tasks/mix`, `tasks/add`, ...; train/tasks.py; splits train /
validation / test) or a JSONL file in TRL's formats, or a directory of them (train/
sft_records.py; splits train / validation: every 100th record, or files named *valid* /
*test*). Both are prepared once into TFDS ArrayRecord and read with `as_data_source` +
grain (train/batching.py: sharding, shuffling, JSON state).

Batch (the LM format of train/batching.py, T = max_length):
    inputs int32[B,T], targets int32[B,T], loss_mask float32[B,T], positions int32[B,T],
    segment_ids int32[B,T] (1, 2, .. per example in a row, 0 = padding).
Each example is tokenized with the chat template (models/chat.py: encode_messages /
encode_prompt_completion; text records as bos + text + eos) into ids and a label mask (True
for assistant / completion tokens and their end of turn); inputs = ids[:-1], targets =
ids[1:], loss_mask = mask[1:]: a target is labelled when its own token is. loss_on="all"
labels every real token. An example longer than T + 1 tokens is truncated to its first
T + 1 (counted in `BatchIterator.num_truncated`, warned about once). An example left with no
labelled token raises NoLabelError naming the dataset, split and example index, when read.
packing=True places several WHOLE examples in a row (grain's FirstFitPackIterDataset):
positions restart at 0 and segment ids number the examples, so attention stays inside each.
"""

from __future__ import annotations

import itertools
import json
import threading
import warnings
from typing import Any

import numpy as np

from fmzoo.train import batching
from fmzoo.train import sft_records as records_lib
from fmzoo.train import tasks as tasks_lib
from fmzoo.train.text_data import UserDataError

LOSS_ON = ("completion", "all")


class NoLabelError(UserDataError):
    """An example with no labelled token: its loss would be 0 / 0."""


# ----------------------------------------------------------------------------- sources


class SFTSource:
    """Random-access normalized records of one split; `src[i]` -> (i, record dict)."""

    def __init__(self, records, name: str, split: str, info):
        self.records, self.name, self.split, self.info = records, name, split, info

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> dict:
        value = self.records[index]["example"]
        return json.loads(value.decode("utf-8") if isinstance(value, bytes) else value)

    def __getitem__(self, index: int):
        return index, self.record(index)


def _data_dir(data_dir):
    from fmzoo.train.data import _quiet_absl, default_data_dir
    return data_dir or default_data_dir(), _quiet_absl


def load_sft_source(name: str, split: str = "train", *, data_dir: str | None = None,
                    rules=None, **options) -> SFTSource:
    """The records of `split` of an embedded task or JSONL file, prepared on first use
    (`rules`: another record format, e.g. train/pref_records.py; see sft_records._rules)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"instruction data must be a task name or a JSONL path, got {name!r}")
    data_dir, quiet = _data_dir(data_dir)
    with quiet():
        builder = records_lib.prepare(name, data_dir, rules=rules, **options)
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise ValueError(f"instruction data {name!r} has no split {split!r}; its splits are "
                         f"{splits}")
    return SFTSource(builder.as_data_source(split=split), name, split, builder.info)


def dataset_format(name_or_path: str) -> str:
    """'messages', 'prompt_completion' or 'text' (a file: its first record decides; the whole
    file is checked when it is prepared)."""
    if tasks_lib.is_task_name(name_or_path):
        tasks_lib.task_names(name_or_path)
        return "prompt_completion"
    path = records_lib.jsonl_path(name_or_path)
    formats = set()
    for files in records_lib.split_files(path).values():
        for f in files:
            formats |= {rec["format"] for _, rec in itertools.islice(
                records_lib.read_records(f), 1)}
    if len(formats) != 1:
        raise UserDataError(f"{path}: " + ("no records (the files are empty or blank)"
                                           if not formats else
                                           f"the files mix formats {sorted(formats)}; use one"))
    return formats.pop()


def eval_split(name: str, data_dir: str | None = None, *, rules=None,
               **options) -> str | None:
    """The held-out split used during training: 'validation' (tasks keep 'test' for final
    evaluation), None for a file too small to have one."""
    if tasks_lib.is_task_name(name):
        tasks_lib.task_names(name)
        return "validation" if tasks_lib.check_knobs(options)["num_validation"] else None
    src = load_sft_source(name, "train", data_dir=data_dir, rules=rules, **options)
    return "validation" if "validation" in src.info.splits else None


# ----------------------------------------------------------------------------- tokens, labels


def encode_record(tokenizer, rec: dict) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one normalized record (models/chat.py); mask True = a label target."""
    from fmzoo.models import chat
    fmt = rec["format"]
    if fmt == "text":
        ids = list(tokenizer.encode(rec["text"], add_bos=True, add_eos=True))
        return ids, [True] * len(ids)
    if fmt == "messages":
        ids, mask = chat.encode_messages(tokenizer, rec["messages"])
        return list(ids), [bool(m) for m in mask]
    # strings: bos + prompt + completion + eos; message lists: the chat template, with the
    # prompt's own assistant turns (few-shot) as context, not labels
    ids, mask = chat.encode_prompt_completion(tokenizer, rec["prompt"], rec["completion"])
    return list(ids), [bool(m) for m in mask]


def _example_encoder(tokenizer, loss_on: str, max_length: int, name: str, split: str,
                     packing: bool):
    def encode(item):
        index, rec = item
        ids, mask = encode_record(tokenizer, rec)
        if loss_on == "all":
            mask = [True] * len(ids)
        truncated = len(ids) > max_length + 1
        ids, mask = ids[:max_length + 1], mask[:max_length + 1]
        labels = np.asarray(mask[1:], np.float32)
        if not labels.any():
            why = (f"after truncation to --max-length {max_length}" if truncated else
                   "(it has no completion / assistant token)")
            where = (f"{rec['where']} (split {split!r} example {index})" if "where" in rec
                     else f"{name} split {split!r} example {index}")
            raise NoLabelError(
                f"{where} has no labelled token {why}; its loss "
                "would be undefined. Use a longer --max-length (the example has "
                f"{len(encode_record(tokenizer, rec)[0])} tokens), --loss-on all, or remove "
                "the example")
        ids_a = np.asarray(ids, np.int32)
        out = {"inputs": ids_a[:-1], "targets": ids_a[1:], "loss_mask": labels}
        out["truncated"] = np.asarray([int(truncated)], np.int32) if packing else truncated
        return out
    return encode


class _SFTBatcher:
    """Stacks examples or packed rows into one batch; counts and warns about truncation."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int, packed: bool):
        self.batch_size, self.seq_len, self.pad_id, self.packed = (batch_size, seq_len, pad_id,
                                                                   packed)
        self.num_truncated = 0
        self._warned = False
        self._lock = threading.Lock()

    def _count(self, n: int) -> None:
        if not n:
            return
        with self._lock:
            self.num_truncated += n
            first, self._warned = not self._warned, True
        if first:
            warnings.warn(f"{n} example(s) in this batch are longer than --max-length "
                          f"{self.seq_len} + 1 tokens and were truncated (the end of their "
                          "completion is not learned); this warning is shown once, "
                          "BatchIterator.num_truncated counts them all. Fix: a longer "
                          "--max-length", UserWarning)

    def __call__(self, items) -> dict[str, np.ndarray]:
        B, T, pad = self.batch_size, self.seq_len, self.pad_id
        pad_rows = batching._pad_rows
        if self.packed:
            self._count(int(sum(r["truncated"].sum() for r in items)))
            seg = pad_rows([r["inputs_segment_ids"] for r in items], B, T, 0, np.int32)
            real = seg > 0
            return {
                "inputs": np.where(real, pad_rows([r["inputs"] for r in items], B, T, pad,
                                                  np.int32), pad).astype(np.int32),
                "targets": np.where(real, pad_rows([r["targets"] for r in items], B, T, pad,
                                                   np.int32), pad).astype(np.int32),
                "loss_mask": np.where(real, pad_rows([r["loss_mask"] for r in items], B, T,
                                                     0, np.float32), 0).astype(np.float32),
                "positions": pad_rows([r["inputs_positions"] for r in items], B, T, 0,
                                      np.int32),
                "segment_ids": seg}
        self._count(sum(bool(e["truncated"]) for e in items))
        lengths = [len(e["inputs"]) for e in items]
        return {
            "inputs": pad_rows([e["inputs"] for e in items], B, T, pad, np.int32),
            "targets": pad_rows([e["targets"] for e in items], B, T, pad, np.int32),
            "loss_mask": pad_rows([e["loss_mask"] for e in items], B, T, 0, np.float32),
            "positions": pad_rows([np.arange(n, dtype=np.int32) for n in lengths], B, T, 0,
                                  np.int32),
            "segment_ids": pad_rows([np.ones(n, np.int32) for n in lengths], B, T, 0,
                                    np.int32)}


def check_batch_settings(what: str, tokenizer, max_length: int, batch_size: int, shard_index,
                         shard_count, seed: int, num_epochs) -> tuple[int, int]:
    """(shard_index, shard_count), None meaning this process's; the checks every chat-data
    batcher (SFT, preference) shares, raised before any data is read."""
    from fmzoo.train.data import _shards
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if getattr(tokenizer, "pad_id", None) is None:
        raise ValueError(f"{what} batches pad rows with the tokenizer's pad_id, which is None; "
                         "load the tokenizer with pad_id (or eos_id) set")
    shard_index, shard_count = _shards(shard_index, shard_count)
    batching._check_common(batch_size, shard_index, shard_count, seed, num_epochs,
                           {"max_length": max_length})
    return shard_index, shard_count


def sft_batches(name_or_path: str, tokenizer, *, batch_size: int, max_length: int,
                split: str = "train", loss_on: str = "completion", packing: bool = False,
                seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int | None = None, shard_count: int | None = None,
                data_dir: str | None = None, num_threads: int = 2,
                **options) -> batching.BatchIterator:
    """Labelled SFT batches (numpy) of this process's shard; see the module docstring.

    batch_size is global (each of shard_count processes gets batch_size // shard_count
    rows); `options` are the embedded tasks' knobs (digits=3, ...)."""
    import grain

    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    shard_index, shard_count = check_batch_settings(
        "SFT", tokenizer, max_length, batch_size, shard_index, shard_count, seed, num_epochs)
    src = load_sft_source(name_or_path, split, data_dir=data_dir, **options)
    if len(src):  # a tokenizer without a chat template fails here, not in a grain thread
        encode_record(tokenizer, src.record(0))
    local = batch_size // shard_count
    T = max_length
    encode = _example_encoder(tokenizer, loss_on, T, name_or_path, split, packing)
    ds = batching._examples(src, shard_index=shard_index, shard_count=shard_count,
                            shuffle=shuffle, seed=seed, num_epochs=num_epochs, encode=encode,
                            num_threads=num_threads)
    if packing:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"inputs": T, "targets": T, "loss_mask": T, "truncated": T},
            num_packing_bins=local, shuffle_bins=False)
    batcher = _SFTBatcher(local, T, tokenizer.pad_id, packing)
    ds = ds.batch(local, batch_fn=batcher)
    spec = {"kind": "sft", "dataset": name_or_path, "split": split,
            "tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__),
            "data_version": src.info.config_name, "batch_size": batch_size, "max_length": T,
            "loss_on": loss_on, "packing": packing, "seed": seed, "shuffle": shuffle,
            "num_epochs": num_epochs, "shard_index": shard_index, "shard_count": shard_count,
            "local_batch_size": local}
    if options:  # as checked, so "3" from the command line and 3 from Python resume alike
        knobs = tasks_lib.check_knobs(options)
        spec.update({k: knobs[k] for k in sorted(options)})
    return batching.BatchIterator(ds, spec, batcher)


# ----------------------------------------------------------------------------- evaluation


def _last_run(mask: list[bool]) -> tuple[int, int]:
    """[start, end) of the last run of labelled tokens (the final reply)."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end


def _prompt_and_answer(rec: dict) -> tuple[list[dict] | str, str]:
    if rec["format"] == "messages":
        msgs = rec["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    c = rec["completion"]
    return rec["prompt"], (c if isinstance(c, str) else "".join(m["content"] for m in c))


def sft_eval_prompts(name: str, tokenizer, split: str, n: int, *,
                     data_dir: str | None = None, **options) -> list[dict[str, Any]]:
    """The first `n` records of `split` as generation prompts: dicts with prompt_ids (the
    tokens the model sees before the final reply, exactly as in training), answer (the
    reference reply), task (the embedded task, else None), messages (the prompt as messages;
    a string prompt becomes one user message) and prompt_text (the last user text). Text
    records have no prompt: [] for a text dataset."""
    src = load_sft_source(name, split, data_dir=data_dir, **options)
    out = []
    for i in range(min(n, len(src))):
        rec = src.record(i)
        if rec["format"] == "text":
            return []
        ids, mask = encode_record(tokenizer, rec)
        if not any(mask):
            continue
        start, _ = _last_run(mask)
        prompt, answer = _prompt_and_answer(rec)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        users = [m["content"] for m in messages if m["role"] == "user"]
        out.append({"prompt_ids": list(ids[:start]), "answer": rec.get("answer", answer),
                    "task": rec.get("task"), "messages": messages,
                    "prompt_text": users[-1] if users else ""})
    return out
