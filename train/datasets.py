"""The zoo's embedded datasets as tensorflow-datasets builders, made offline without TensorFlow.

- `algorithmic/{copy,reverse,sort,addition}`: seq2seq string tasks with {'source', 'target'}
  text features. Knobs (builder kwargs): min_len, max_len (symbols per sequence; digits per
  operand for addition), num_train, num_test, seed. Default knobs use the named config
  (`algorithmic/reverse`); other knobs get their own config name (e.g.
  `reverse_len20-40_n5000-500_seed0`), so every variant lives in its own directory. The test
  split avoids sources that occur in train wherever the length range leaves room for that.
- `python_docs`: one document per standard-library module of the running Python: its
  docstrings (`ast`) and comments (`tokenize`) in source order. {'module', 'text'}. Files are
  read in sorted order; every 20th file (index % 20 == 0) is validation. The config name
  carries the Python version (`py3_11_7`, plus `_files50` with the max_files knob) and the
  dataset metadata records it (`info.metadata['python_version']`).

TFDS 4.9 needs no TensorFlow for this path: GeneratorBasedBuilder + ArrayRecord writing +
`as_data_source` only use numpy, array_record and protobuf. The builders pass a DatasetInfo
directly rather than `dataset_info_from_configs`, which would read README/checksum files
from the package directory. TFDS writes into `<dir>/incomplete.XXXX` and renames it on
success (tensorflow_datasets/core/utils/file_utils.py:incomplete_dir), so a failed build
leaves nothing that a later run would trust; a file lock keeps two local processes (the
multi-host test) from building the same variant at once.

tensorflow_datasets is imported inside functions only; `builder_classes()` defines (and so
registers with TFDS) the builder classes on first use.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import platform
import re
import sysconfig
import threading
import tokenize

import numpy as np

TASKS = ("copy", "reverse", "sort", "addition")
ALGORITHMIC_DEFAULTS = {"min_len": 1, "max_len": 20, "num_train": 5000, "num_test": 500,
                        "seed": 0}
PYTHON_DOCS_KNOBS = ("max_files",)
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Folders of the stdlib that are not documentation prose: test suites, demo/IDE code,
# generated codec tables, the pydoc topic dump, third-party installs.
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "encodings", "pydoc_data",
             "site-packages", "dist-packages", "__pycache__", "__phello__"}
_CODING_RE = re.compile(r"^[ \t\f]*#.*?coding[:=]")


# ----------------------------------------------------------------------------- algorithmic


def algorithmic_pair(task: str, rng: np.random.Generator, min_len: int, max_len: int):
    """One (source, target) string pair of `task`."""
    if task == "addition":
        a, b = (_random_number(rng, int(rng.integers(min_len, max_len + 1))) for _ in range(2))
        return f"{a}+{b}", str(a + b)
    n = int(rng.integers(min_len, max_len + 1))
    src = "".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), size=n))
    tgt = {"copy": src, "reverse": src[::-1], "sort": "".join(sorted(src))}[task]
    return src, tgt


def _random_number(rng: np.random.Generator, digits: int) -> int:
    first = int(rng.integers(1 if digits > 1 else 0, 10))
    rest = "".join(str(d) for d in rng.integers(0, 10, size=digits - 1))
    return int(str(first) + rest)


def algorithmic_examples(task: str, split: str, *, min_len: int, max_len: int,
                         num_train: int, num_test: int, seed: int) -> list[tuple[str, str]]:
    """The examples of one split, a pure function of the arguments."""
    def draw(split_id, n, avoid=frozenset()):
        rng = np.random.default_rng([seed, TASKS.index(task), split_id])
        out = []
        for _ in range(n):
            pair = algorithmic_pair(task, rng, min_len, max_len)
            for _ in range(20):  # bounded: tiny length ranges cannot avoid train entirely
                if pair[0] not in avoid:
                    break
                pair = algorithmic_pair(task, rng, min_len, max_len)
            out.append(pair)
        return out

    train = draw(0, num_train)
    if split == "train":
        return train
    return draw(1, num_test, avoid=frozenset(s for s, _ in train))


def check_algorithmic_knobs(task: str, knobs: dict) -> dict:
    """The full knob dict for `task`, or a ValueError naming the bad knob."""
    if task not in TASKS:
        raise ValueError(f"unknown algorithmic task {task!r}; use one of "
                         + ", ".join(f"algorithmic/{t}" for t in TASKS))
    unknown = sorted(set(knobs) - set(ALGORITHMIC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for algorithmic/{task}; the options are "
                         f"{sorted(ALGORITHMIC_DEFAULTS)}")
    k = {**ALGORITHMIC_DEFAULTS, **knobs}
    for key, value in k.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"algorithmic/{task}: {key} must be an integer, got {value!r}")
    if not 1 <= k["min_len"] <= k["max_len"]:
        raise ValueError(f"algorithmic/{task}: need 1 <= min_len <= max_len, got "
                         f"min_len={k['min_len']}, max_len={k['max_len']}")
    if k["num_train"] < 1 or k["num_test"] < 1 or k["seed"] < 0:
        raise ValueError(f"algorithmic/{task}: num_train and num_test must be >= 1 and seed "
                         f">= 0, got {k}")
    return {key: int(v) for key, v in k.items()}


def algorithmic_config_name(task: str, k: dict) -> str:
    if all(k[key] == v for key, v in ALGORITHMIC_DEFAULTS.items()):
        return task
    return (f"{task}_len{k['min_len']}-{k['max_len']}_n{k['num_train']}-{k['num_test']}"
            f"_seed{k['seed']}")


# ----------------------------------------------------------------------------- python_docs


def python_version_tag() -> str:
    return "py" + platform.python_version().replace(".", "_").replace("+", "")


def stdlib_files(max_files: int | None = None) -> tuple[str, list[str]]:
    """(stdlib root, sorted relative paths of its documentation-bearing .py files)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-")]
        rel = os.path.relpath(folder, root)
        files += [os.path.normpath(os.path.join(rel, n)) for n in names if n.endswith(".py")]
    files.sort()
    return root, files[:max_files] if max_files else files


def module_name(rel_path: str) -> str:
    name = rel_path[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def module_text(source: bytes) -> str:
    """Docstrings and comment blocks of one module, in source order, blank-line separated."""
    items = []  # (line, text)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                items.append((node.body[0].lineno, doc.strip()))
    blocks = []  # [first line, last line, texts]: consecutive comment lines form one block
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        text = tok.string.lstrip("#").strip()
        if (line <= 2 and (text.startswith("!") or _CODING_RE.match(tok.string))) or \
                not any(c.isalnum() for c in text):
            continue  # shebang / coding cookie / ruler lines carry no prose
        if blocks and line == blocks[-1][1] + 1:
            blocks[-1][1] = line
            blocks[-1][2].append(text)
        else:
            blocks.append([line, line, [text]])
    items += [(first, "\n".join(texts)) for first, _, texts in blocks]
    items.sort(key=lambda item: item[0])
    return "\n\n".join(text for _, text in items)


def python_docs_examples(max_files: int | None = None):
    """Yields (index, {'module', 'text'}, split) for the stdlib; skips unparsable files."""
    root, files = stdlib_files(max_files)
    for i, rel in enumerate(files):
        with open(os.path.join(root, rel), "rb") as f:
            source = f.read()
        try:
            text = module_text(source)
        except (SyntaxError, ValueError, tokenize.TokenError, UnicodeDecodeError):
            continue
        if text:
            yield i, {"module": module_name(rel), "text": text}, \
                ("validation" if i % 20 == 0 else "train")


# ----------------------------------------------------------------------------- TFDS builders


# _NO_CODE_PATH: TFDS 4.9.10 looks for a download-checksums file next to a builder's module
# (DatasetBuilder.code_path), and for a builder inside a package that lookup imports the
# `importlib_resources` backport, which TFDS does not declare (tensorflow/datasets#11212).
# Nothing is downloaded here, so the builders declare no code path and skip the lookup.


_CLASSES: dict = {}
_CLASSES_LOCK = threading.Lock()


def builder_classes():
    """{'algorithmic': (cls, config cls), 'python_docs': ...}, defined once per process
    (defining a builder class registers it with TFDS, which refuses a second definition)."""
    with _CLASSES_LOCK:
        if not _CLASSES:
            _CLASSES.update(_define_builders())
        return _CLASSES


def _define_builders():
    import dataclasses

    import tensorflow_datasets as tfds

    @dataclasses.dataclass(eq=False)
    class AlgorithmicConfig(tfds.core.BuilderConfig):
        task: str = "copy"
        min_len: int = ALGORITHMIC_DEFAULTS["min_len"]
        max_len: int = ALGORITHMIC_DEFAULTS["max_len"]
        num_train: int = ALGORITHMIC_DEFAULTS["num_train"]
        num_test: int = ALGORITHMIC_DEFAULTS["num_test"]
        seed: int = ALGORITHMIC_DEFAULTS["seed"]

        def knobs(self) -> dict:
            return {k: getattr(self, k) for k in ALGORITHMIC_DEFAULTS}

    class Algorithmic(tfds.core.GeneratorBasedBuilder):
        """Copy, reverse, sort and addition of random strings (seq2seq)."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # see _NO_CODE_PATH
        BUILDER_CONFIGS = [AlgorithmicConfig(name=t, task=t, description=f"{t} task")
                           for t in TASKS]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__,
                features=tfds.features.FeaturesDict(
                    {"source": tfds.features.Text(), "target": tfds.features.Text()}),
                supervised_keys=("source", "target"),
                metadata=tfds.core.MetadataDict(task=self.builder_config.task,
                                                **self.builder_config.knobs()))

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing is downloaded
            return {s: self._generate_examples(s) for s in ("train", "test")}

        def _generate_examples(self, split):
            c = self.builder_config
            for i, (src, tgt) in enumerate(algorithmic_examples(c.task, split, **c.knobs())):
                yield i, {"source": src, "target": tgt}

    @dataclasses.dataclass(eq=False)
    class PythonDocsConfig(tfds.core.BuilderConfig):
        max_files: int | None = None

    class PythonDocs(tfds.core.GeneratorBasedBuilder):
        """Docstrings and comments of the running Python's standard library (LM text)."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # see _NO_CODE_PATH
        BUILDER_CONFIGS = [PythonDocsConfig(name=python_version_tag(),
                                            description=f"Python {platform.python_version()}")]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__,
                features=tfds.features.FeaturesDict(
                    {"module": tfds.features.Text(), "text": tfds.features.Text()}),
                metadata=tfds.core.MetadataDict(
                    python_version=platform.python_version(),
                    python_implementation=platform.python_implementation(),
                    max_files=self.builder_config.max_files,
                    skip_dirs=sorted(SKIP_DIRS), validation_rule="file_index % 20 == 0"))

        def _split_generators(self, dl_manager):
            del dl_manager
            # one pass over the stdlib feeds both splits
            examples = list(python_docs_examples(self.builder_config.max_files))
            return {s: self._generate_examples(examples, s) for s in ("train", "validation")}

        def _generate_examples(self, examples, split):
            for i, example, which in examples:
                if which == split:
                    yield i, example

    return {"algorithmic": (Algorithmic, AlgorithmicConfig),
            "python_docs": (PythonDocs, PythonDocsConfig)}


def embedded_builder(name: str, data_dir: str, **knobs):
    """The (not necessarily prepared) TFDS builder of an embedded dataset variant."""
    classes = builder_classes()
    if name == "python_docs":
        unknown = sorted(set(knobs) - set(PYTHON_DOCS_KNOBS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for python_docs; the options are "
                             f"{list(PYTHON_DOCS_KNOBS)}")
        max_files = knobs.get("max_files")
        if max_files is not None and (not isinstance(max_files, int) or max_files < 1):
            raise ValueError(f"python_docs: max_files must be a positive integer or None, "
                             f"got {max_files!r}")
        cls, cfg_cls = classes["python_docs"]
        config = (python_version_tag() if not max_files else
                  cfg_cls(name=f"{python_version_tag()}_files{max_files}", max_files=max_files,
                          description=f"Python {platform.python_version()}, first {max_files} "
                                      "files"))
    else:
        task = name.split("/", 1)[1]
        k = check_algorithmic_knobs(task, knobs)
        cls, cfg_cls = classes["algorithmic"]
        cname = algorithmic_config_name(task, k)
        config = cname if cname == task else cfg_cls(name=cname, task=task, **k)
    return cls(config=config, data_dir=data_dir, file_format="array_record")


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_embedded(name: str, data_dir: str, **knobs):
    """The prepared builder: built on first use (atomically, under a lock), reused after."""
    builder = embedded_builder(name, data_dir, **knobs)
    if builder.is_prepared():
        return builder
    lock = os.path.join(data_dir, ".fmzoo_locks",
                        f"{builder.name}-{builder.builder_config.name}.lock")
    with _file_lock(lock):
        builder = embedded_builder(name, data_dir, **knobs)  # another process may have built it
        if not builder.is_prepared():
            builder.download_and_prepare(file_format="array_record")
    return builder
