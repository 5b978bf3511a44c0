"""Host-side batching on grain: shuffle, shard, tokenize, pack or pad, batch (numpy out).

Shapes: B = local batch size (global batch / shard count), T = sequence length (targets per
row), S = source length.

LM batch (`lm_pipeline`):
    inputs int32[B,T], targets int32[B,T], loss_mask float32[B,T], positions int32[B,T],
    segment_ids int32[B,T] (1, 2, .. per document in a row, 0 = padding).
  Each document is tokenized as bos + text + eos; its inputs are tokens[:-1] and its targets
  tokens[1:], so a target never comes from another document.
  - pack=True: grain's ConcatThenSplitIterDataset concatenates documents into rows of T and
    splits a document that does not fit: the rest continues in the next row as a new segment
    whose positions restart at 0. Nothing is dropped or repeated.
  - pack=False: one document per row, right padded. A document longer than T + 1 tokens is
    TRUNCATED to its first T + 1 tokens; each pipeline warns once (UserWarning) when the first
    truncated example appears, and `BatchIterator.num_truncated` counts all of them.
Seq2seq batch (`seq2seq_pipeline`):
    src int32[B,S], src_mask bool[B,S], tgt_in int32[B,T] (bos + target),
    tgt_out int32[B,T] (target + eos), tgt_mask bool[B,T]; right padded with pad_id.
  A source longer than S or a target longer than T - 1 tokens is truncated (same warning).
Padding uses pad_id in token arrays, 0 in positions/segment ids, False/0 in masks. A finite
run (num_epochs set) ends with a partial batch padded with empty rows, so shapes never change.

Order: the source is sharded first (example i goes to shard i % shard_count), then shuffled
with `seed` (a different permutation each epoch), repeated, tokenized in grain threads,
packed/padded and batched. The iterator state (grain's) round-trips through JSON exactly.
"""

from __future__ import annotations

import json
import threading
import warnings
from typing import Any, Callable, Sequence

import numpy as np

STATE_FORMAT = "fmzoo.data/1"


# ---------------------------------------------------------------------------- iterator state


def _encode_state(obj):
    """grain states hold tuples (packing slices) that JSON would turn into lists; tag them."""
    if isinstance(obj, dict):
        return {str(k): _encode_state(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode_state(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode_state(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode_state(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_decode_state(v) for v in obj["__tuple__"])
        return {k: _decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_state(v) for v in obj]
    return obj


class BatchIterator:
    """Iterator of numpy batch dicts; `get_state()` is a JSON-safe dict, `set_state` restores
    it exactly (the next batch is the one that would have come next)."""

    def __init__(self, dataset, spec: dict, batcher: "_Batcher"):
        self._dataset = dataset
        self._it = iter(dataset)
        self.spec = spec
        self._batcher = batcher
        self.local_batch_size = spec["local_batch_size"]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    @property
    def num_truncated(self) -> int:
        """Examples truncated so far (padded LM mode and seq2seq)."""
        return self._batcher.num_truncated

    def get_state(self) -> dict[str, Any]:
        state = {"format": STATE_FORMAT, "pipeline": dict(self.spec),
                 "grain": _encode_state(self._it.get_state())}
        json.dumps(state)  # fail here, not inside a checkpoint writer
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a data-iterator state of format {STATE_FORMAT!r}: "
                             f"{str(state)[:200]}; pass what get_state() returned")
        saved = state["pipeline"]
        diff = {k: (saved.get(k), v) for k, v in self.spec.items() if saved.get(k) != v}
        if diff:
            raise ValueError("the data-iterator state belongs to a different pipeline; "
                             "(saved, now) differ in " + ", ".join(f"{k}={a!r} vs {b!r}" for
                                                                   k, (a, b) in diff.items())
                             + ". Rebuild the pipeline with the saved settings.")
        self._it.set_state(_decode_state(state["grain"]))


# ---------------------------------------------------------------------------- batch assembly


class _Batcher:
    """Stacks per-example dicts into one padded batch; counts and warns about truncation."""

    def __init__(self, batch_size: int, make_rows: Callable, what: str):
        self.batch_size = batch_size
        self.make_rows = make_rows
        self.what = what
        self.num_truncated = 0
        self._warned = False
        self._lock = threading.Lock()

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        n_trunc = sum(bool(e.get("truncated", False)) for e in examples)
        if n_trunc:
            with self._lock:
                self.num_truncated += n_trunc
                first = not self._warned
                self._warned = True
            if first:
                warnings.warn(
                    f"{n_trunc} of {len(examples)} examples in this batch are longer than "
                    f"{self.what} and were truncated; this warning is shown once per "
                    "pipeline, BatchIterator.num_truncated counts every truncated example "
                    "(use pack=True for LM data to keep every token)", UserWarning)
        return self.make_rows(examples, self.batch_size)


def _pad_rows(rows: Sequence[np.ndarray], batch_size: int, length: int, fill, dtype):
    out = np.full((batch_size, length), fill, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return out


def _lm_padded_rows(pad_id: int, seq_len: int):
    def make(examples, batch_size):
        toks = [e["tokens"] for e in examples]
        lengths = [len(t) - 1 for t in toks]
        inputs = _pad_rows([t[:-1] for t in toks], batch_size, seq_len, pad_id, np.int32)
        targets = _pad_rows([t[1:] for t in toks], batch_size, seq_len, pad_id, np.int32)
        real = _pad_rows([np.ones(n, np.int32) for n in lengths], batch_size, seq_len, 0,
                         np.int32)
        positions = _pad_rows([np.arange(n, dtype=np.int32) for n in lengths], batch_size,
                              seq_len, 0, np.int32)
        return {"inputs": inputs, "targets": targets, "loss_mask": real.astype(np.float32),
                "positions": positions, "segment_ids": real}
    return make


def _lm_packed_rows(pad_id: int, seq_len: int):
    def make(rows, batch_size):
        seg = _pad_rows([r["inputs_segment_ids"] for r in rows], batch_size, seq_len, 0,
                        np.int32)
        real = seg > 0
        # grain pads packed rows with 0, which is a real byte; use pad_id like padded mode
        inputs = np.where(real, _pad_rows([r["inputs"] for r in rows], batch_size, seq_len,
                                          pad_id, np.int32), pad_id).astype(np.int32)
        targets = np.where(real, _pad_rows([r["targets"] for r in rows], batch_size, seq_len,
                                           pad_id, np.int32), pad_id).astype(np.int32)
        positions = _pad_rows([r["inputs_positions"] for r in rows], batch_size, seq_len, 0,
                              np.int32)
        return {"inputs": inputs, "targets": targets, "loss_mask": real.astype(np.float32),
                "positions": positions, "segment_ids": seg}
    return make


def _seq2seq_rows(pad_id: int, bos_id: int, eos_id: int, src_len: int, tgt_len: int):
    def make(examples, batch_size):
        src = [e["src"] for e in examples]
        tgt = [e["tgt"] for e in examples]
        return {
            "src": _pad_rows(src, batch_size, src_len, pad_id, np.int32),
            "src_mask": _pad_rows([np.ones(len(s), bool) for s in src], batch_size, src_len,
                                  False, bool),
            "tgt_in": _pad_rows([np.concatenate([[bos_id], t]) for t in tgt], batch_size,
                                tgt_len, pad_id, np.int32),
            "tgt_out": _pad_rows([np.concatenate([t, [eos_id]]) for t in tgt], batch_size,
                                 tgt_len, pad_id, np.int32),
            "tgt_mask": _pad_rows([np.ones(len(t) + 1, bool) for t in tgt], batch_size,
                                  tgt_len, False, bool),
        }
    return make


# ---------------------------------------------------------------------------- pipelines


def _check_common(batch_size, shard_index, shard_count, seed, num_epochs, lengths: dict):
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                         f"shard_count={shard_count}")
    if batch_size < 1 or batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} is the global batch and must be a positive "
                         f"multiple of shard_count={shard_count} (each process gets "
                         "batch_size // shard_count rows)")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")
    for name, value in lengths.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _examples(source, *, shard_index, shard_count, shuffle, seed, num_epochs, encode,
              num_threads):
    """The sharded, shuffled, repeated, tokenized stream as a grain IterDataset."""
    import grain
    if len(source) < shard_count:
        raise ValueError(f"the data has {len(source)} examples, fewer than shard_count="
                         f"{shard_count}; every shard needs at least one")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs).map(encode)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=max(8, 4 * num_threads)))


def lm_pipeline(source, tokens_fn: Callable[[Any], Sequence[int]], *, batch_size: int,
                seq_len: int, pad_id: int, pack: bool = True, seed: int = 0,
                shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0,
                shard_count: int = 1, num_threads: int = 2,
                spec: dict | None = None) -> BatchIterator:
    """LM batches from a random-access `source`; `tokens_fn(example)` gives a document's ids
    (bos/eos included). See the module docstring for the batch format."""
    import grain
    _check_common(batch_size, shard_index, shard_count, seed, num_epochs, {"seq_len": seq_len})
    local = batch_size // shard_count

    def encode(example):
        tokens = np.asarray(tokens_fn(example), dtype=np.int32)
        if pack:
            return {"inputs": tokens[:-1], "targets": tokens[1:]}
        return {"tokens": tokens[:seq_len + 1], "truncated": len(tokens) > seq_len + 1}

    ds = _examples(source, shard_index=shard_index, shard_count=shard_count, shuffle=shuffle,
                   seed=seed, num_epochs=num_epochs, encode=encode, num_threads=num_threads)
    if pack:
        ds = ds.filter(lambda e: len(e["inputs"]) > 0)
        ds = grain.experimental.ConcatThenSplitIterDataset(
            ds, length_struct={"inputs": seq_len, "targets": seq_len})
        batcher = _Batcher(local, _lm_packed_rows(pad_id, seq_len), f"seq_len={seq_len}")
    else:
        ds = ds.filter(lambda e: len(e["tokens"]) > 1)
        batcher = _Batcher(local, _lm_padded_rows(pad_id, seq_len),
                           f"seq_len + 1 = {seq_len + 1} tokens")
    ds = ds.batch(local, batch_fn=batcher)
    full_spec = {**(spec or {}), "kind": "lm", "batch_size": batch_size, "seq_len": seq_len,
                 "pack": pack, "seed": seed, "shuffle": shuffle, "num_epochs": num_epochs,
                 "shard_index": shard_index, "shard_count": shard_count,
                 "local_batch_size": local}
    return BatchIterator(ds, full_spec, batcher)


def seq2seq_pipeline(source, pair_fn: Callable[[Any], tuple[Sequence[int], Sequence[int]]], *,
                     batch_size: int, src_len: int, tgt_len: int, pad_id: int, bos_id: int,
                     eos_id: int, seed: int = 0, shuffle: bool = True,
                     num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                     num_threads: int = 2, spec: dict | None = None) -> BatchIterator:
    """Seq2seq batches; `pair_fn(example)` gives (source ids, target ids) without bos/eos."""
    _check_common(batch_size, shard_index, shard_count, seed, num_epochs,
                  {"src_len": src_len, "tgt_len": tgt_len})
    if None in (pad_id, bos_id, eos_id):
        raise ValueError(f"seq2seq batches need a tokenizer with pad, bos and eos ids; got "
                         f"pad_id={pad_id}, bos_id={bos_id}, eos_id={eos_id}")
    local = batch_size // shard_count

    def encode(example):
        src, tgt = (np.asarray(x, dtype=np.int32) for x in pair_fn(example))
        return {"src": src[:src_len], "tgt": tgt[:tgt_len - 1],
                "truncated": len(src) > src_len or len(tgt) > tgt_len - 1}

    ds = _examples(source, shard_index=shard_index, shard_count=shard_count, shuffle=shuffle,
                   seed=seed, num_epochs=num_epochs, encode=encode, num_threads=num_threads)
    batcher = _Batcher(local, _seq2seq_rows(pad_id, bos_id, eos_id, src_len, tgt_len),
                       f"src_len={src_len} / tgt_len - 1 = {tgt_len - 1} tokens")
    ds = ds.batch(local, batch_fn=batcher)
    full_spec = {**(spec or {}), "kind": "seq2seq", "batch_size": batch_size,
                 "src_len": src_len, "tgt_len": tgt_len, "seed": seed, "shuffle": shuffle,
                 "num_epochs": num_epochs, "shard_index": shard_index,
                 "shard_count": shard_count, "local_batch_size": local}
    return BatchIterator(ds, full_spec, batcher)
