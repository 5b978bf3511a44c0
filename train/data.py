"""Public entry points of fmzoo's input pipeline: datasets by name -> numpy batches.

Embedded datasets (EMBEDDED) are TFDS builders in train/datasets.py, built offline and
without TensorFlow on first use into `data_dir` ($FMZOO_DATA_DIR, else
~/.cache/fmzoo/tensorflow_datasets). Any other name is a TFDS catalog dataset
(tiny_shakespeare, lm1b, wmt14_translate/de-en, ...): it is read through the same
`as_data_source` + grain path once it is prepared as ArrayRecord in data_dir (or in TFDS's own
data dir); otherwise a clear error says how to prepare it. Batch formats and the truncation /
packing rules are in train/batching.py.

    src = load_source("algorithmic/reverse", "test", max_len=40)   # random access, dicts
    it = lm_batches("python_docs", ByteTokenizer(), batch_size=8, seq_len=256)
    batch = next(it); state = it.get_state()   # JSON-safe; it.set_state(state) resumes
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from typing import Any, Sequence

from fmzoo.train import batching

EMBEDDED = ("algorithmic/copy", "algorithmic/reverse", "algorithmic/sort",
            "algorithmic/addition", "python_docs")
_KINDS = {"python_docs": "lm", **{n: "seq2seq" for n in EMBEDDED if n.startswith("algo")}}
# Old-style TFDS modules that hold text datasets (wmt*_translate lives in `translate`); they
# are lazily imported by TFDS, so name lookup imports them first.
_TEXT_GROUPS = ("text", "translate", "summarization", "question_answering")


def default_data_dir() -> str:
    return os.environ.get("FMZOO_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fmzoo", "tensorflow_datasets")


@contextlib.contextmanager
def _quiet_absl():
    """TFDS logs a warning for every not-yet-built variant and custom config; expected here."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class ExampleSource:
    """Random-access examples of one split: `len(src)`, `src[i]` -> dict of str (bytes
    decoded as UTF-8; other features as stored). `kind` is 'lm' (text in `fields[0]`) or
    'seq2seq' (source, target in `fields`); `info` is the TFDS DatasetInfo (None for a
    plain Python sequence)."""

    def __init__(self, records, *, name: str, split: str, kind: str,
                 fields: tuple[str, ...], info=None):
        self.records, self.name, self.split = records, name, split
        self.kind, self.fields, self.info = kind, fields, info

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v.decode("utf-8") if isinstance(v, bytes) else v
                for k, v in self.records[index].items()}

    def __repr__(self):
        return (f"ExampleSource({self.name!r}, split={self.split!r}, kind={self.kind!r}, "
                f"len={len(self)})")


def _catalog_names() -> list[str]:
    import importlib

    import tensorflow_datasets as tfds
    for group in _TEXT_GROUPS:
        with contextlib.suppress(Exception):  # a group that needs TensorFlow is simply absent
            importlib.import_module(f"tensorflow_datasets.{group}")
    own = {n.split("/")[0] for n in EMBEDDED}  # registered with TFDS by train/datasets.py
    return [n for n in tfds.list_builders(with_community_datasets=False) if n not in own]


def _unknown(name: str) -> ValueError:
    catalog = _catalog_names()
    close = difflib.get_close_matches(name, list(EMBEDDED) + catalog, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown dataset {name!r}.{hint} Embedded datasets (built offline, no download): "
        f"{', '.join(EMBEDDED)}. Other names must be TFDS catalog datasets "
        "(tfds.list_builders()), e.g. tiny_shakespeare, lm1b, wmt14_translate/de-en.")


def _catalog_builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds
    _catalog_names()  # registers the lazily imported text builders
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _unknown(name) from None


def _catalog_fields(name: str, info) -> tuple[str, tuple[str, ...]]:
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys) \
            and keys[0] != keys[1]:
        return "seq2seq", keys
    features = info.features
    names = list(features.keys()) if hasattr(features, "keys") else []
    if "text" in names:
        return "lm", ("text",)
    texts = [n for n in names if type(features[n]).__name__ == "Text"]
    if len(texts) == 1:
        return "lm", (texts[0],)
    raise ValueError(f"dataset {name!r} has no single text feature (features: {names}, "
                     f"supervised_keys: {keys}); fmzoo reads text (LM) or (source, target) "
                     "text pairs (seq2seq) only")


def _not_prepared(name: str, dirs: Sequence[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} is not prepared as ArrayRecord in {' or '.join(dirs)}, and fmzoo "
        "does not download catalog datasets. Prepare it once on a machine with network "
        "access (TFDS's generation of most catalog datasets also needs TensorFlow: pip "
        "install tensorflow tensorflow-datasets):\n"
        f"    tfds build {name} --data_dir={dirs[0]} --file_format=array_record\n"
        "then copy that directory here or point data_dir / $FMZOO_DATA_DIR at it. "
        "A copy prepared as TFRecord converts with `tfds convert_format "
        "--dataset_version_dir=<dir>/<name>/<config>/<version> --out_file_format=array_record`."
        f" The embedded datasets need none of this: {', '.join(EMBEDDED)}.")


def _split_base(split: str) -> str:
    return re.split(r"[\[+]", split, maxsplit=1)[0]


def _check_split(name: str, split: str, info) -> None:
    splits = sorted(info.splits.keys()) if info.splits else []
    if splits and _split_base(split) not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; its splits are {splits}")


def _embedded_source(name: str, split: str, data_dir: str, builder_kwargs: dict):
    from fmzoo.train import datasets
    if name.startswith("algorithmic/") and name not in EMBEDDED:
        raise _unknown(name)
    with _quiet_absl():
        builder = datasets.prepare_embedded(name, data_dir, **builder_kwargs)
    _check_split(name, split, builder.info)
    kind = _KINDS[name]
    fields = ("text",) if kind == "lm" else ("source", "target")
    return ExampleSource(builder.as_data_source(split=split), name=name, split=split,
                         kind=kind, fields=fields, info=builder.info)


def _catalog_source(name: str, split: str, data_dir: str | None, builder_kwargs: dict):
    with _quiet_absl():
        return _open_catalog(name, split, data_dir, builder_kwargs)


def _open_catalog(name: str, split: str, data_dir: str | None, builder_kwargs: dict):
    if builder_kwargs:
        raise ValueError(f"builder options {sorted(builder_kwargs)} apply to the embedded "
                         f"datasets only ({', '.join(EMBEDDED)}), not to {name!r}")
    import tensorflow_datasets as tfds
    dirs = [data_dir] if data_dir else [default_data_dir(), str(tfds.core.constants.DATA_DIR)]
    builders = [_catalog_builder(name, d) for d in dirs]
    ready = [b for b in builders if b.is_prepared()]
    builder = (ready or builders)[0]
    kind, fields = _catalog_fields(name, builder.info)
    try:
        records = builder.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001 - re-raised below with the fix
        if not ready:
            raise _not_prepared(name, dirs) from e
        if str(builder.info.file_format) != str(tfds.core.FileFormat.ARRAY_RECORD):
            raise ValueError(
                f"dataset {name!r} in {builder.data_dir} is stored as "
                f"{builder.info.file_format}; fmzoo reads ArrayRecord. Convert it with "
                f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
                "--out_file_format=array_record`") from e
        _check_split(name, split, builder.info)
        raise
    return ExampleSource(records, name=name, split=split, kind=kind, fields=fields,
                         info=builder.info)


def load_source(name: str, split: str = "train", *, data_dir: str | None = None,
                **builder_kwargs) -> ExampleSource:
    """Random-access examples of dataset `name`, building an embedded one on first use.

    builder_kwargs (embedded only): algorithmic/* take min_len, max_len, num_train, num_test,
    seed; python_docs takes max_files. Unknown name -> ValueError listing the embedded
    datasets and close names; catalog dataset not prepared -> FileNotFoundError with the
    command that prepares it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if name in EMBEDDED or name.startswith("algorithmic/"):
        return _embedded_source(name, split, data_dir or default_data_dir(), builder_kwargs)
    return _catalog_source(name, split, data_dir, builder_kwargs)


def dataset_kind(name: str, *, data_dir: str | None = None) -> str:
    """'lm' or 'seq2seq' (catalog: seq2seq when supervised_keys name two different features)."""
    if name in _KINDS:
        return _KINDS[name]
    if name.startswith("algorithmic/"):
        raise _unknown(name)
    with _quiet_absl():
        builder = _catalog_builder(name, data_dir or default_data_dir())
        return _catalog_fields(name, builder.info)[0]


def as_source(data, kind: str, *, split: str = "train", data_dir: str | None = None,
              **builder_kwargs) -> ExampleSource:
    """A dataset name, an ExampleSource, or a plain sequence (LM: str or {'text'}; seq2seq:
    (source, target) or {'source', 'target'}) as an ExampleSource of the wanted kind."""
    if isinstance(data, str):
        data = load_source(data, split, data_dir=data_dir, **builder_kwargs)
    elif builder_kwargs:
        raise ValueError(f"builder options {sorted(builder_kwargs)} need a dataset name")
    if isinstance(data, ExampleSource):
        if data.kind != kind:
            raise ValueError(f"dataset {data.name!r} is a {data.kind} dataset; use "
                             f"{'lm_batches' if data.kind == 'lm' else 'seq2seq_batches'}")
        return data
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__") or not len(data):
        raise ValueError("data must be a dataset name, an ExampleSource or a non-empty "
                         f"random-access sequence, got {type(data).__name__}")
    first = data[0]
    if kind == "lm":
        if isinstance(first, str):
            data = [{"text": t} for t in data]
        elif not (isinstance(first, dict) and "text" in first):
            raise ValueError("LM data items must be str or dicts with a 'text' key, got "
                             f"{first!r:.100}")
        return ExampleSource(data, name="<memory>", split=split, kind=kind, fields=("text",))
    if isinstance(first, (tuple, list)) and len(first) == 2:
        data = [{"source": s, "target": t} for s, t in data]
    elif not (isinstance(first, dict) and {"source", "target"} <= set(first)):
        raise ValueError("seq2seq data items must be (source, target) pairs or dicts with "
                         f"'source' and 'target' keys, got {first!r:.100}")
    return ExampleSource(data, name="<memory>", split=split, kind=kind,
                         fields=("source", "target"))


def _shards(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    return int(shard_index), int(shard_count)


def _tokenizer(tokenizer):
    if tokenizer is None:
        from fmzoo.models.tokenizer import ByteTokenizer
        return ByteTokenizer()
    return tokenizer


def lm_batches(name_or_source, tokenizer=None, *, batch_size: int, seq_len: int,
               split: str = "train", pack: bool = True, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, shard_index: int | None = None,
               shard_count: int | None = None, data_dir: str | None = None,
               num_threads: int = 2, **builder_kwargs) -> batching.BatchIterator:
    """Language-model batches (numpy) of this process's shard; see train/batching.py.

    batch_size is global: each of shard_count processes gets batch_size // shard_count rows.
    Documents are tokenized as bos + text + eos with `tokenizer` (ByteTokenizer by default)."""
    tok = _tokenizer(tokenizer)
    src = as_source(name_or_source, "lm", split=split, data_dir=data_dir, **builder_kwargs)
    key = src.fields[0]
    shard_index, shard_count = _shards(shard_index, shard_count)
    return batching.lm_pipeline(
        src, lambda ex: tok.encode(ex[key], add_bos=True, add_eos=True),
        batch_size=batch_size, seq_len=seq_len, pad_id=tok.pad_id, pack=pack, seed=seed,
        shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
        shard_count=shard_count, num_threads=num_threads,
        spec={"dataset": src.name, "split": split, "tokenizer": getattr(tok, "kind", "?"),
              **{k: builder_kwargs[k] for k in sorted(builder_kwargs)}})


def seq2seq_batches(name_or_source, tokenizer=None, *, batch_size: int, src_len: int,
                    tgt_len: int, split: str = "train", seed: int = 0, shuffle: bool = True,
                    num_epochs: int | None = None, shard_index: int | None = None,
                    shard_count: int | None = None, data_dir: str | None = None,
                    num_threads: int = 2, **builder_kwargs) -> batching.BatchIterator:
    """Seq2seq batches (numpy): src/src_mask, tgt_in = bos + target, tgt_out = target + eos,
    tgt_mask; same sharding, shuffling and state rules as lm_batches."""
    tok = _tokenizer(tokenizer)
    src = as_source(name_or_source, "seq2seq", split=split, data_dir=data_dir,
                    **builder_kwargs)
    s_key, t_key = src.fields
    shard_index, shard_count = _shards(shard_index, shard_count)
    return batching.seq2seq_pipeline(
        src, lambda ex: (tok.encode(ex[s_key]), tok.encode(ex[t_key])),
        batch_size=batch_size, src_len=src_len, tgt_len=tgt_len, pad_id=tok.pad_id,
        bos_id=tok.bos_id, eos_id=tok.eos_id, seed=seed, shuffle=shuffle,
        num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
        num_threads=num_threads,
        spec={"dataset": src.name, "split": split, "tokenizer": getattr(tok, "kind", "?"),
              **{k: builder_kwargs[k] for k in sorted(builder_kwargs)}})
