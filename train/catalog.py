"""TFDS catalog datasets (tiny_shakespeare, lm1b, wmt14_translate/de-en, ...) read as
ArrayRecord through `as_data_source`: finding the builder, its text fields, and the message
that says how to prepare one. fmzoo never downloads them. Used by train/data.py, which owns
the dataset registry; the embedded names are passed in so that this module imports nothing
of fmzoo's. tensorflow_datasets is imported inside functions only.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

# Old-style TFDS modules that hold text datasets (wmt*_translate lives in `translate`); they
# are lazily imported by TFDS, so name lookup imports them first.
_TEXT_GROUPS = ("text", "translate", "summarization", "question_answering")
# Builders fmzoo defines (train/datasets.py, train/text_data.py): not catalog datasets.
_OWN_BUILDERS = ("user_text",)


def names(embedded: Sequence[str]) -> list[str]:
    """The TFDS catalog's dataset names, without fmzoo's own builders."""
    import importlib

    import tensorflow_datasets as tfds
    for group in _TEXT_GROUPS:
        with contextlib.suppress(Exception):  # a group that needs TensorFlow is simply absent
            importlib.import_module(f"tensorflow_datasets.{group}")
    own = {n.split("/")[0] for n in embedded} | set(_OWN_BUILDERS)
    return [n for n in tfds.list_builders(with_community_datasets=False) if n not in own]


def builder(name: str, data_dir: str, unknown: Callable[[str], Exception],
            embedded: Sequence[str]):
    import tensorflow_datasets as tfds
    names(embedded)  # registers the lazily imported text builders
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise unknown(name) from None


def fields(name: str, info) -> tuple[str, tuple[str, ...]]:
    """('seq2seq', (source, target)) when supervised_keys name two different features, else
    ('lm', (the one text feature,))."""
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys) \
            and keys[0] != keys[1]:
        return "seq2seq", keys
    features = info.features
    feature_names = list(features.keys()) if hasattr(features, "keys") else []
    if "text" in feature_names:
        return "lm", ("text",)
    texts = [n for n in feature_names if type(features[n]).__name__ == "Text"]
    if len(texts) == 1:
        return "lm", (texts[0],)
    raise ValueError(f"dataset {name!r} has no single text feature (features: "
                     f"{feature_names}, supervised_keys: {keys}); fmzoo reads text (LM) or "
                     "(source, target) text pairs (seq2seq) only")


def not_prepared(name: str, dirs: Sequence[str], embedded: Sequence[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} is not prepared as ArrayRecord in {' or '.join(dirs)}, and fmzoo "
        "does not download catalog datasets. Prepare it once on a machine with network "
        "access (TFDS's generation of most catalog datasets also needs TensorFlow: pip "
        "install tensorflow tensorflow-datasets):\n"
        f"    tfds build {name} --data_dir={dirs[0]} --file_format=array_record\n"
        "then copy that directory here or point data_dir / $FMZOO_DATA_DIR at it. "
        "A copy prepared as TFRecord converts with `tfds convert_format "
        "--dataset_version_dir=<dir>/<name>/<config>/<version> --out_file_format=array_record`."
        f" The embedded datasets need none of this: {', '.join(embedded)}.")


def find(name: str, dirs: Sequence[str], unknown: Callable[[str], Exception],
         embedded: Sequence[str]):
    """(the builder to read: the first prepared one in dirs, else the first; is it prepared)."""
    builders = [builder(name, d, unknown, embedded) for d in dirs]
    ready = [b for b in builders if b.is_prepared()]
    return (ready or builders)[0], bool(ready)


def open_split(name: str, split: str, dirs: Sequence[str], unknown: Callable[[str], Exception],
               embedded: Sequence[str], check_split: Callable[[str, str, object], None]):
    """(records, kind, fields, info) of one split; the errors say how to fix the data dir."""
    import tensorflow_datasets as tfds
    b, ready = find(name, dirs, unknown, embedded)
    kind, keys = fields(name, b.info)
    try:
        records = b.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001 - re-raised below with the fix
        if not ready:
            raise not_prepared(name, dirs, embedded) from e
        if str(b.info.file_format) != str(tfds.core.FileFormat.ARRAY_RECORD):
            raise ValueError(
                f"dataset {name!r} in {b.data_dir} is stored as {b.info.file_format}; fmzoo "
                f"reads ArrayRecord. Convert it with `tfds convert_format "
                f"--dataset_version_dir={b.data_dir} --out_file_format=array_record`") from e
        check_split(name, split, b.info)
        raise
    return records, kind, keys, b.info
