"""Public entry points of fmzoo's input pipeline: datasets by name -> numpy batches, and
the dataset registry (REGISTRY: kind, held-out split and options of each embedded dataset;
`dataset_kind`, `eval_split`, `default_options` answer for every kind of dataset).

Three kinds of `--data`, tried in this order:
- embedded datasets (EMBEDDED): TFDS builders in train/datasets.py, built offline and
  without TensorFlow on first use into `data_dir` ($FMZOO_DATA_DIR, else
  ~/.cache/fmzoo/tensorflow_datasets);
- user data: a path to a text file, a directory of text files or a JSONL file with a "text"
  field (train/text_data.py), prepared into data_dir once and again when it changes;
- any other name is a TFDS catalog dataset (tiny_shakespeare, lm1b, wmt14_translate/de-en,
  ...; train/catalog.py): read through the same `as_data_source` + grain path once it is
  prepared as ArrayRecord in data_dir (or in TFDS's own data dir); otherwise a clear error
  says how to prepare it.
Batch formats and the truncation / packing rules are in train/batching.py.

    src = load_source("algorithmic/reverse", "test", max_len=40)   # random access, dicts
    it = lm_batches("python_docs", ByteTokenizer(), batch_size=8, seq_len=256)
    it = lm_batches("notes/", batch_size=8, seq_len=256)   # every *.txt, *.md, ... below
    batch = next(it); state = it.get_state()   # JSON-safe; it.set_state(state) resumes
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import re
from typing import Any

from fmzoo.train import batching, datasets
from fmzoo.train import catalog as catalog_lib


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What training needs to know about an embedded dataset without building it."""
    kind: str  # 'lm' (text) or 'seq2seq' (source, target)
    eval_split: str | None  # the held-out split
    options: tuple[tuple[str, Any], ...]  # builder option -> default value
    about: str  # one line for help texts


# The dataset registry: every fact about an embedded dataset lives here, nowhere else.
REGISTRY: dict[str, DatasetSpec] = {
    **{f"algorithmic/{task}": DatasetSpec(
        "seq2seq", "test", tuple(datasets.ALGORITHMIC_DEFAULTS.items()),
        f"{task} random strings (seq2seq, splits train/test)" if task != "addition" else
        "add two random integers (seq2seq, splits train/test)") for task in datasets.TASKS},
    "python_docs": DatasetSpec(
        "lm", "validation", tuple((k, None) for k in datasets.PYTHON_DOCS_KNOBS),
        "docstrings and comments of the Python standard library (LM, train/validation)"),
}
EMBEDDED = tuple(REGISTRY)
# The dataset a message suggests when a model needs the other kind of data.
EXAMPLES = {"lm": "python_docs", "seq2seq": "algorithmic/reverse"}


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


def _unknown(name: str) -> ValueError:
    catalog = catalog_lib.names(EMBEDDED)
    close = difflib.get_close_matches(name, list(EMBEDDED) + catalog, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown dataset {name!r}.{hint} Embedded datasets (built offline, no download): "
        f"{', '.join(EMBEDDED)}. Other names must be TFDS catalog datasets "
        "(tfds.list_builders()), e.g. tiny_shakespeare, lm1b, wmt14_translate/de-en.")


def _split_base(split: str) -> str:
    return re.split(r"[\[+]", split, maxsplit=1)[0]


def _check_split(name: str, split: str, info) -> None:
    splits = sorted(info.splits.keys()) if info.splits else []
    if splits and _split_base(split) not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; its splits are {splits}")


def _embedded_source(name: str, split: str, data_dir: str, builder_kwargs: dict):
    spec = _embedded_spec(name)
    with _quiet_absl():
        builder = datasets.prepare_embedded(name, data_dir, **builder_kwargs)
    _check_split(name, split, builder.info)
    fields = ("text",) if spec.kind == "lm" else ("source", "target")
    return ExampleSource(builder.as_data_source(split=split), name=name, split=split,
                         kind=spec.kind, fields=fields, info=builder.info)


def _user_source(path: str, split: str, data_dir: str, builder_kwargs: dict):
    from fmzoo.train import text_data
    _no_options(path, builder_kwargs)
    with _quiet_absl():
        builder = text_data.prepare_user_text(path, data_dir)
    _check_split(path, split, builder.info)
    return ExampleSource(builder.as_data_source(split=split), name=path, split=split,
                         kind="lm", fields=("text",), info=builder.info)


def _catalog_source(name: str, split: str, data_dir: str | None, builder_kwargs: dict):
    _no_options(name, builder_kwargs)
    with _quiet_absl():
        records, kind, fields, info = catalog_lib.open_split(
            name, split, _catalog_dirs(data_dir), _unknown, EMBEDDED, _check_split)
    return ExampleSource(records, name=name, split=split, kind=kind, fields=fields, info=info)


def _catalog_dirs(data_dir: str | None) -> list[str]:
    import tensorflow_datasets as tfds
    return [data_dir] if data_dir else [default_data_dir(), str(tfds.core.constants.DATA_DIR)]


def _no_options(name: str, options: dict) -> None:
    if options:
        raise ValueError(f"builder options {sorted(options)} apply to the embedded "
                         f"datasets only ({', '.join(EMBEDDED)}), not to {name!r}")


# Families of embedded names: "algorithmic/foo" is a typo to report, not a catalog name.
_FAMILIES = tuple(sorted({n.split("/")[0] + "/" for n in REGISTRY if "/" in n}))


def _embedded_spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise _unknown(name)
    return REGISTRY[name]


def is_embedded(name: str) -> bool:
    """True for a registered embedded name (and for a typo inside an embedded family, which
    load_source then reports with the close names)."""
    return name in REGISTRY or name.startswith(_FAMILIES)


def user_data_path(name: str) -> str | None:
    """The file or directory `name` names as user data, or None for a dataset name.

    Embedded names win; then anything that exists on disk, or looks like a path (starts with
    /, ./, ../ or ~, or ends in a text suffix such as .txt or .jsonl), is user data; every
    other name is a TFDS catalog name. A path that looks like one but does not exist ->
    FileNotFoundError."""
    from fmzoo.train import text_data
    if is_embedded(name):
        return None
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    if name.startswith(("/", "./", "../", "~")) or \
            os.path.splitext(name)[1].lower() in text_data.ALL_SUFFIXES:
        raise FileNotFoundError(
            f"data path {name!r} does not exist; --data takes a text file, a directory of "
            "text files or a JSONL file with a \"text\" field, or a dataset name "
            f"({', '.join(EMBEDDED)} or a TFDS catalog name)")
    return None


def _check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")


def load_source(name: str, split: str = "train", *, data_dir: str | None = None,
                **builder_kwargs) -> ExampleSource:
    """Random-access examples of dataset `name`, building an embedded one on first use.

    `name` may also be user data (a text file, directory or JSONL file; see
    train/text_data.py), prepared into data_dir once and again whenever it changes.
    builder_kwargs (embedded only): algorithmic/* take min_len, max_len, num_train, num_test,
    seed; python_docs takes max_files. Unknown name -> ValueError listing the embedded
    datasets and close names; catalog dataset not prepared -> FileNotFoundError with the
    command that prepares it."""
    _check_name(name)
    if is_embedded(name):
        return _embedded_source(name, split, data_dir or default_data_dir(), builder_kwargs)
    path = user_data_path(name)
    if path is not None:
        return _user_source(path, split, data_dir or default_data_dir(), builder_kwargs)
    return _catalog_source(name, split, data_dir, builder_kwargs)


def dataset_kind(name: str, data_dir: str | None = None) -> str:
    """'lm' or 'seq2seq' (catalog: seq2seq when supervised_keys name two different features;
    user data: lm). Unknown names raise here, before any work."""
    _check_name(name)
    if is_embedded(name):
        return _embedded_spec(name).kind
    if user_data_path(name) is not None:
        return "lm"
    with _quiet_absl():
        builder = catalog_lib.builder(name, data_dir or default_data_dir(), _unknown, EMBEDDED)
        return catalog_lib.fields(name, builder.info)[0]


def eval_split(name: str, data_dir: str | None = None, **options) -> str | None:
    """The held-out split of dataset `name` ('validation', 'test', ...), None if it has none.

    Embedded datasets answer from the registry without building anything; user data is
    prepared (once) to learn whether it was large enough for a validation split; a catalog
    dataset answers with the first of 'validation', 'test' it has."""
    _check_name(name)
    if is_embedded(name):
        return _embedded_spec(name).eval_split
    if user_data_path(name) is not None:
        splits = load_source(name, "train", data_dir=data_dir, **options).info.splits
        return "validation" if "validation" in splits else None
    for split in ("validation", "test"):
        try:
            load_source(name, split, data_dir=data_dir, **options)
            return split
        except ValueError as e:  # "has no split" (not prepared raises FileNotFoundError)
            if "has no split" not in str(e):
                raise
    return None


def default_options(name: str) -> dict[str, Any]:
    """The builder options dataset `name` accepts, with their defaults ({} if none)."""
    return dict(_embedded_spec(name).options) if is_embedded(name) else {}


def describe() -> str:
    """One line per embedded dataset, plus the other kinds of --data, for help texts."""
    lines = [f"{n}: {s.about}" for n, s in REGISTRY.items()]
    lines.append("PATH: a text file, a directory of text files or a JSONL file with a "
                 "\"text\" field (LM)")
    lines.append("NAME: a TFDS catalog dataset prepared as ArrayRecord (lm1b, "
                 "wmt14_translate/de-en, ...)")
    return "\n".join(lines)


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
              **_version(src), **{k: builder_kwargs[k] for k in sorted(builder_kwargs)}})


def _version(src) -> dict:
    """User data carries its files' fingerprint (the builder config name) in the pipeline
    spec, so resuming after the files changed is refused instead of silently continuing."""
    if src.info is None or user_data_path(src.name) is None:
        return {}
    return {"data_version": src.info.config_name}


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
