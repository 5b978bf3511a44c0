"""Preference data: TRL's preference JSONL or embedded tasks -> batches of (chosen, rejected).

`--data` is an embedded task (`tasks/mix`, `tasks/add`, ...: correct against wrong answers,
train/pref_tasks.py; splits train / validation / test) or a JSONL file in TRL's preference
format, or a directory of them (train/pref_records.py; splits train / validation). Both are
prepared once into TFDS ArrayRecord and read with `as_data_source` + grain (train/
batching.py: sharding, shuffling, JSON iterator state), as SFT data is.

Batch (the issue-11 contract; B = local batch, axis 2 = (chosen, rejected), T = max_length):
    tokens        int32[B,2,T]   [BOS] prompt + response + its end of turn, pad_id padded
    mask          int32[B,2,T]   1 = real token, 0 = padding (right or left: padding_side)
    response_mask float32[B,2,T] 1 on the response's tokens and its EOS / end-of-turn token
    margin        float32[B]     the record's "margin", 0.0 when absent
    index         int32[B]       the pair's index in its split (stable across epochs and
                                 resume; -1 on the empty rows that pad a final batch)
Positions are not in the batch: positions = maximum(cumsum(mask, -1) - 1, 0).

Each side is tokenized as SFT's prompt-completion example (models/chat.py:
encode_prompt_completion): message lists through the chat template (the prompt rendered with
the generation prompt), strings as bos + prompt + response + eos; so the prompt's ids are
one shared prefix of both sides and BOS appears once. A pair whose longer side exceeds T
tokens is truncated as TRL does: the prompt first, from the left (its BOS stays), then the
responses from the end (their end of turn is then lost); counted in
`BatchIterator.num_truncated` and warned about once.
"""

from __future__ import annotations

import numpy as np

from fmzoo.train import batching
from fmzoo.train import pref_records
from fmzoo.train import sft_data
from fmzoo.train import tasks as tasks_lib

PADDING_SIDES = ("right", "left")


def load_pref_source(name: str, split: str = "train", *, data_dir: str | None = None,
                     **options) -> sft_data.SFTSource:
    """The normalized preference records of `split`, prepared on first use; src[i] ->
    (i, record)."""
    return sft_data.load_sft_source(name, split, data_dir=data_dir, rules=pref_records,
                                    **options)


def pref_eval_split(name: str, data_dir: str | None = None, **options) -> str | None:
    """The held-out split used during training: 'validation' (tasks keep 'test' for final
    evaluation), None for a file too small to have one."""
    return sft_data.eval_split(name, data_dir, rules=pref_records, **options)


def encode_pair(tokenizer, record: dict) -> tuple[list[int], list[bool], list[int],
                                                  list[bool]]:
    """(chosen_ids, chosen_response_mask, rejected_ids, rejected_response_mask) of one
    preference record; a mask is True on the response's tokens and its end of turn."""
    from fmzoo.models import chat
    out = []
    for key in ("chosen", "rejected"):
        ids, mask = chat.encode_prompt_completion(tokenizer, record["prompt"], record[key])
        out += [list(ids), [bool(m) for m in mask]]
    return tuple(out)


def _prompt_length(mask: list[bool]) -> int:
    return next((k for k, m in enumerate(mask) if m), len(mask))


def fit_pair(pair: tuple, max_length: int, bos_id) -> tuple[tuple, bool]:
    """(encode_pair's 4-tuple cut to max_length tokens a side, whether it was cut): the
    prompt from the left (its BOS stays), then the responses from the end."""
    c_ids, c_mask, r_ids, r_mask = pair
    longest = max(len(c_ids), len(r_ids))
    if longest <= max_length:
        return pair, False
    p = min(_prompt_length(c_mask), _prompt_length(r_mask))
    keep = int(p > 0 and bos_id is not None and c_ids[0] == bos_id)
    drop = min(longest - max_length, p - keep)
    return tuple((x[:keep] + x[keep + drop:])[:max_length] for x in pair), True




def _pair_encoder(tokenizer, max_length: int, name: str, split: str):
    def encode(item):
        index, rec = item
        pair = encode_pair(tokenizer, rec)
        (c_ids, c_mask, r_ids, r_mask), truncated = fit_pair(pair, max_length,
                                                            tokenizer.bos_id)
        if not (any(c_mask) and any(r_mask)):
            where = rec.get("where", f"{name} split {split!r} pair {index}")
            raise sft_data.NoLabelError(f"{where}: a response has no token to score; give "
                                        "both chosen and rejected a reply")
        return {"chosen": (np.asarray(c_ids, np.int32), np.asarray(c_mask, np.float32)),
                "rejected": (np.asarray(r_ids, np.int32), np.asarray(r_mask, np.float32)),
                "margin": float(rec.get("margin", 0.0)), "index": int(index),
                "truncated": truncated}
    return encode


def _pair_rows(pad_id: int, max_length: int, padding_side: str):
    def make(pairs, batch_size):
        B, T = batch_size, max_length
        tokens_B2T = np.full((B, 2, T), pad_id, np.int32)
        mask_B2T = np.zeros((B, 2, T), np.int32)
        response_B2T = np.zeros((B, 2, T), np.float32)
        margin_B = np.zeros((B,), np.float32)
        index_B = np.full((B,), -1, np.int32)
        for b, e in enumerate(pairs):
            margin_B[b], index_B[b] = e["margin"], e["index"]
            for k, (ids, labels) in enumerate((e["chosen"], e["rejected"])):
                n = len(ids)
                at = slice(0, n) if padding_side == "right" else slice(T - n, T)
                tokens_B2T[b, k, at], mask_B2T[b, k, at] = ids, 1
                response_B2T[b, k, at] = labels
        return {"tokens": tokens_B2T, "mask": mask_B2T, "response_mask": response_B2T,
                "margin": margin_B, "index": index_B}
    return make


def _check_settings(tokenizer, max_length: int, padding_side: str, batch_size: int,
                    shard_index, shard_count, seed: int, num_epochs) -> tuple[int, int]:
    """(shard_index, shard_count), None meaning this process's; bad settings raise."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    return sft_data.check_batch_settings("preference", tokenizer, max_length, batch_size,
                                         shard_index, shard_count, seed, num_epochs)


def pref_batches(name_or_path: str, tokenizer, *, batch_size: int, max_length: int,
                 split: str = "train", padding_side: str = "right", seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 data_dir: str | None = None, num_threads: int = 2,
                 **options) -> batching.BatchIterator:
    """Preference batches (numpy) of this process's shard; see the module docstring.

    batch_size is global (each of shard_count processes gets batch_size // shard_count
    pairs); `options` are the embedded tasks' knobs (digits=3, ...). get_state/set_state
    resume exactly."""
    shard_index, shard_count = _check_settings(tokenizer, max_length, padding_side, batch_size,
                                               shard_index, shard_count, seed, num_epochs)
    src = load_pref_source(name_or_path, split, data_dir=data_dir, **options)
    if len(src):  # a tokenizer without a chat template fails here, not in a grain thread
        encode_pair(tokenizer, src.record(0))
    spec = dict(kind="preference", dataset=name_or_path, split=split,
                tokenizer=getattr(tokenizer, "kind", type(tokenizer).__name__),
                data_version=src.info.config_name, batch_size=batch_size,
                max_length=max_length, padding_side=padding_side, seed=seed, shuffle=shuffle,
                num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
                local_batch_size=batch_size // shard_count)
    if options:  # as checked, so "3" from the command line and 3 from Python resume alike
        knobs = tasks_lib.check_knobs(options)
        spec.update({k: knobs[k] for k in sorted(options)})
    ds = batching._examples(src, shard_index=shard_index, shard_count=shard_count,
                            shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                            encode=_pair_encoder(tokenizer, max_length, name_or_path, split),
                            num_threads=num_threads)
    batcher = batching._Batcher(spec["local_batch_size"],
                                _pair_rows(tokenizer.pad_id, max_length, padding_side),
                                f"max_length={max_length} tokens (the prompt was cut from the "
                                "left, then the responses from the end)")
    return batching.BatchIterator(ds.batch(spec["local_batch_size"], batch_fn=batcher), spec,
                                  batcher)
