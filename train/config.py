"""The one schema of run settings, and the command line generated from it.

A training command's settings are a frozen dataclass of sections (model, data, optim,
mesh, checkpoint, eval, run). Every knob is declared once, here, with its default and its
help text; `add_arguments` turns the sections into argparse options, `from_args` turns the
parsed options back into settings, and `to_dict` / `from_dict` store them in the workdir
(DIR/fmzoo_run.json). Validation runs on construction, so a bad value is refused with one
message naming the option and the fix, whichever way the settings were made.

A new training command (sft, reward, dpo, ...) adds ONE section:

    @dataclasses.dataclass(frozen=True)
    class DPOSection(Section):
        beta: float = setting(0.1, "KL strength of the DPO loss", min=0.0)

    @dataclasses.dataclass(frozen=True)
    class DPOSettings(Settings):
        dpo: DPOSection = dataclasses.field(default_factory=DPOSection)

and gets `--beta` on its command line, validation, and a stored record for free.

This module imports no jax (the CLI builds its parser from it); errors are the models'
ConfigError, imported when one is raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
SCHEDULES = ("cosine", "rsqrt")
RECIPE_FIELDS = ("lr", "warmup", "schedule")  # the optim fields a recipe may fill


def config_error(msg: str) -> Exception:
    """The models' ConfigError (a ValueError), imported only when there is an error."""
    from fmzoo.models.config import ConfigError
    return ConfigError(msg)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
            min: float | None = None, choices: tuple | None = None, action: str | None = None,
            metavar: str | None = None, required: bool = False):
    """One declared knob: its default, help text and checks. `flag` overrides the option
    name (default --section-field for 'eval' style prefixes, else --field); `action` is
    'store_true', 'invert' (a --no-x / --sync-x flag storing False), 'pairs' (KEY=VALUE,
    repeatable) or 'positional_pairs' (trailing key=value words)."""
    meta = dict(help=help, flag=flag, min=min, choices=choices, action=action,
                metavar=metavar, required=required)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_of(cls, name: str):
    """(base type, optional) of a field's annotation: int | None -> (int, True)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if args and type(None) in args:
        return [a for a in args if a is not type(None)][0], True
    return (typing.get_origin(hint) or hint), False


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of every section: type and range checks from the field declarations."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            self._check(f, getattr(self, f.name))

    def _check(self, f: dataclasses.Field, value: Any) -> None:
        base, optional = _type_of(type(self), f.name)
        flag = flag_of(type(self), f)
        where = f"{flag} (settings {self.section_name()}.{f.name})"
        if value is None:
            if optional:
                return
            raise config_error(f"{where} is required; pass {flag} VALUE")
        ok = {int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              bool: isinstance(value, bool), str: isinstance(value, str),
              dict: isinstance(value, dict)}[base]
        if not ok:
            raise config_error(f"{where} must be {base.__name__}, got {type(value).__name__} "
                               f"{value!r}; pass e.g. {flag} {f.default!r}")
        if base is float and not (value == value and abs(value) != float("inf")):
            raise config_error(f"{where} must be a finite number, got {value}")
        low = f.metadata.get("min")
        if low is not None and value < low:
            raise config_error(f"{where} must be >= {low:g}, got {value}; "
                               f"pass {flag} {low:g} or more")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise config_error(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        if base is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: argv bytes that are not UTF-8
                raise config_error(f"{where} is not valid UTF-8 text; pass UTF-8 text "
                                   "(check the shell's locale)") from None

    @classmethod
    def section_name(cls) -> str:
        return getattr(cls, "NAME", cls.__name__.lower())

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Section":
        if not isinstance(d, dict):
            raise config_error(f"settings section {cls.section_name()!r} must be a JSON "
                               f"object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise config_error(f"settings section {cls.section_name()!r} has no field(s) "
                               f"{unknown}; known: {sorted(names)}")
        return cls(**d)


def flag_of(cls, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    NAME: typing.ClassVar[str] = "model"
    source: str = setting("gpt-tiny", "starting point: a preset (see `fmzoo models`), a "
                          "training workdir or a Hugging Face directory", flag="--model",
                          metavar="NAME|DIR")
    overrides: dict = setting({}, "model config overrides, e.g. n_layers=2 dropout=0.1",
                              action="positional_pairs", metavar="key=value")
    dtype: str | None = setting(None, "compute dtype (params and optimizer state stay "
                                "float32); when not given, the model config's", choices=DTYPES)
    remat: str | None = setting(None, "activation checkpointing per block: none, full "
                                "(recompute the block) or dots (keep matmul outputs); when not "
                                "given, the model config's", choices=REMAT)

    def config_overrides(self) -> dict:
        """The overrides with --dtype / --remat folded in (they are model config fields)."""
        extra = {k: v for k, v in (("dtype", self.dtype), ("remat", self.remat)) if v}
        return {**self.overrides, **extra}


@dataclasses.dataclass(frozen=True)
class DataSourceSection(Section):
    """What every training command reads: the dataset, where it is prepared, the batch and
    the tokenizer; each command adds its row lengths (and its own default dataset)."""
    NAME: typing.ClassVar[str] = "data"
    name: str = setting("python_docs", "dataset: an embedded name (python_docs, "
                        "algorithmic/reverse, ...), a text/JSONL file or directory, or a "
                        "prepared TFDS catalog name", flag="--data", metavar="NAME|PATH")
    data_dir: str | None = setting(None, "TFDS data dir; when not given, $FMZOO_DATA_DIR or "
                                   "~/.cache/fmzoo/tensorflow_datasets", metavar="DIR")
    options: dict = setting({}, "dataset builder option, repeatable, e.g. max_len=40 for "
                            "algorithmic/*", flag="--data-opt", action="pairs",
                            metavar="KEY=VALUE")
    batch_size: int = setting(16, "global batch size (rows, over all processes)", min=1)
    tokenizer: str | None = setting(None, "tokenizer directory; when not given, the "
                                    "starting workdir's or HF dir's tokenizer, else bytes",
                                    metavar="DIR")


@dataclasses.dataclass(frozen=True)
class DataSection(DataSourceSection):
    seq_len: int = setting(128, "LM row length; for seq2seq the source and target length "
                           "unless --src-len / --tgt-len are given", min=1)
    src_len: int | None = setting(None, "seq2seq source length; when not given, --seq-len",
                                  min=1)
    tgt_len: int | None = setting(None, "seq2seq target length; when not given, --seq-len",
                                  min=1)


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
    NAME: typing.ClassVar[str] = "optim"
    # None = the model's recipe (models/recipes.py, shown by `fmzoo models`): the command
    # fills them before training, so the Trainer and the stored run record see numbers
    lr: float | None = setting(None, "peak learning rate of AdamW; when not given, the "
                               "model's recipe (see `fmzoo models`)", min=0.0)
    warmup: int | None = setting(None, "warm-up steps (linear up to --lr); when not given, "
                                 "the model's recipe", min=0)
    schedule: str | None = setting(None, "learning-rate schedule: cosine (warm-up then cosine "
                                   "decay to lr/10) or rsqrt (warm-up then 1/sqrt(step), the "
                                   "Transformer paper's); when not given, the model's recipe",
                                   choices=SCHEDULES)
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices", min=0.0)
    clip_norm: float = setting(1.0, "gradient clipping by global norm (0 = off)", min=0.0)
    accum: int = setting(1, "gradient accumulation: microbatches per step", min=1)


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    NAME: typing.ClassVar[str] = "mesh"
    spec: str | None = setting(None, "device mesh, e.g. data=2,fsdp=2,tensor=2; when not "
                               "given, data parallel over all devices", flag="--mesh",
                               metavar="SPEC")
    pmap: bool = setting(False, "data parallel with jax.pmap instead of jit on a mesh",
                         action="store_true")

    def __post_init__(self):
        super().__post_init__()
        if self.pmap and self.spec:
            raise config_error(f"--pmap and --mesh {self.spec} exclude each other (pmap is "
                               "plain data parallel); drop one of them")


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
    NAME: typing.ClassVar[str] = "checkpoint"
    save_every: int = setting(200, "save a checkpoint every N steps (and at the end)", min=1)
    keep: int = setting(3, "checkpoints kept (older ones are deleted)", min=1)
    async_save: bool = setting(True, "save checkpoints synchronously (default: in the "
                               "background)", flag="--sync-save", action="invert")


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    NAME: typing.ClassVar[str] = "eval"
    every: int = setting(200, "evaluate every N steps (0 = only at the end)", min=0,
                         flag="--eval-every")
    batches: int = setting(4, "held-out batches per evaluation", min=1, flag="--eval-batches")
    sample_prompt: str = setting("def ", "LM prompt continued greedily at each evaluation")
    sample_tokens: int = setting(96, "tokens sampled at each evaluation (0 = no sample)",
                                 min=0)


@dataclasses.dataclass(frozen=True)
class RunSection(Section):
    NAME: typing.ClassVar[str] = "run"
    workdir: str | None = setting(None, "directory for checkpoints, metrics and the run "
                                  "record", required=True, metavar="DIR")
    steps: int = setting(1800, "total optimizer steps (a resumed run continues up to this)",
                         min=1)
    seed: int = setting(0, "seed of the init, dropout and data order")
    log_every: int = setting(10, "log train metrics every N steps", min=1)
    resume: bool = setting(False, "continue from the workdir's latest checkpoint",
                           action="store_true")
    progress: bool = setting(True, "no progress bar", flag="--no-progress", action="invert")

    def __post_init__(self):
        super().__post_init__()
        if self.workdir is not None and not self.workdir.strip():
            raise config_error("--workdir is empty; pass a directory, e.g. --workdir runs/x")


def _section(cls):
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings of the pretraining command; other commands subclass it with a section."""
    model: ModelSection = _section(ModelSection)
    data: DataSection = _section(DataSection)
    optim: OptimSection = _section(OptimSection)
    mesh: MeshSection = _section(MeshSection)
    checkpoint: CheckpointSection = _section(CheckpointSection)
    eval: EvalSection = _section(EvalSection)
    run: RunSection = _section(RunSection)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), Section):
                raise config_error(f"settings.{f.name} must be a {f.type} section")
        if self.run.workdir is None:
            raise config_error("--workdir is required; pass --workdir DIR")

    @classmethod
    def sections(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def replace(self, **sections: dict) -> "Settings":
        """settings.replace(optim=dict(lr=1e-3)): new settings with some fields changed."""
        return dataclasses.replace(self, **{
            k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()})

    def to_dict(self) -> dict:
        return {name: getattr(self, name).to_dict() for name in self.sections()}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        if not isinstance(d, dict):
            raise config_error(f"settings must be a JSON object, got {type(d).__name__}")
        sections = cls.sections()
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise config_error(f"settings have no section(s) {unknown}; known: "
                               f"{sorted(sections)}")
        return cls(**{k: sections[k].from_dict(v) for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def stored(self) -> dict:
        """What the workdir records: everything but the per-invocation switches."""
        d = self.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("resume", "progress")}
        return d


def with_recipe(settings: Settings, recipe: dict) -> Settings:
    """The settings with the optim fields the user left out (None) taken from `recipe`
    ({'lr', 'warmup', 'schedule', ...}; other keys such as 'why' are ignored). A value the
    user gave always wins; a field the recipe lacks stays None."""
    fill = {k: recipe[k] for k in RECIPE_FIELDS
            if k in recipe and recipe[k] is not None and getattr(settings.optim, k) is None}
    return settings.replace(optim=fill) if fill else settings


# --------------------------------------------------------------------- checks with a model


def check_with_model(settings: Settings, config: Any) -> None:
    """The checks that need the model config (max_len)."""
    max_len = getattr(config, "max_len", None)
    e = settings.eval
    # only an LM's sample is --sample-tokens long (a seq2seq sample follows its target)
    if getattr(config, "family", None) == "lm" and e.sample_tokens > max_len:
        raise config_error(f"--sample-tokens {e.sample_tokens} is more than the model's "
                           f"max_len={max_len}; pass --sample-tokens {max_len} or less")


def check_resume(settings: Settings, checkpoint_step: int) -> None:
    if settings.run.steps < checkpoint_step:
        raise config_error(f"--resume --steps {settings.run.steps}: the checkpoint is already "
                           f"at step {checkpoint_step}; pass --steps {checkpoint_step + 1} or "
                           "more to train further")


# ------------------------------------------------------------------------- the CLI


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each default once (not for None / off switches) and keeps examples' lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or isinstance(default, (bool, list, dict)) or
                default is argparse.SUPPRESS or "(default" in text or
                not action.option_strings):
            return text
        return f"{text} (default: {default!r})" if isinstance(default, str) else \
            f"{text} (default: {default})"


def parse_pairs(pairs: list[str], what: str) -> dict:
    """['n_layers=2', 'dtype=bfloat16'] -> {'n_layers': 2, 'dtype': 'bfloat16'} (JSON values)."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise config_error(f"{what} {pair!r} is not key=value (e.g. n_layers=2)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = {"None": None, "True": True, "False": False}.get(value, value)
    return out


def _dest(section: str, name: str) -> str:
    return f"{section}__{name}"


def add_arguments(parser: argparse.ArgumentParser, settings_cls: type = Settings) -> None:
    """One option per field of every section of `settings_cls`, each with its help and its
    default; `from_args` reads them back."""
    parser.formatter_class = HelpFormatter
    parser.set_defaults(_settings_cls=settings_cls)
    for sec_name, sec_cls in settings_cls.sections().items():
        group = parser.add_argument_group(f"{sec_name} settings")
        for f in dataclasses.fields(sec_cls):
            _add_one(group, sec_name, sec_cls, f)


def _add_one(group, sec_name: str, sec_cls, f: dataclasses.Field) -> None:
    m, dest = f.metadata, _dest(sec_name, f.name)
    kw: dict[str, Any] = dict(dest=dest, help=m["help"])
    action = m.get("action")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if action == "positional_pairs":
        group.add_argument(dest, nargs="*", metavar=m["metavar"], default=[], help=m["help"])
        return
    if action == "pairs":
        kw.update(action="append", default=[], metavar=m["metavar"])
    elif action == "store_true":
        kw.update(action="store_true", default=False)
    elif action == "invert":
        kw.update(action="store_false", default=True)
    else:
        base, _ = _type_of(sec_cls, f.name)
        kw.update(default=default, type=_cli_value(base), required=m.get("required", False),
                  metavar=m.get("metavar") or {int: "N", float: "X"}.get(base, "TEXT"))
        if m.get("choices"):
            kw.update(choices=m["choices"], metavar=None)
    group.add_argument(flag_of(sec_cls, f), **kw)


def _cli_value(base):
    def convert(text: str):
        if base is str:
            return text
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if base is int else 'a number'}") from None
    convert.__name__ = base.__name__
    return convert


def from_args(args: argparse.Namespace, settings_cls: type | None = None) -> Settings:
    """The settings the parsed options describe (validated)."""
    cls = settings_cls or getattr(args, "_settings_cls", Settings)
    sections = {}
    for sec_name, sec_cls in cls.sections().items():
        values = {}
        for f in dataclasses.fields(sec_cls):
            v = getattr(args, _dest(sec_name, f.name))
            action = f.metadata.get("action")
            if action in ("pairs", "positional_pairs"):
                v = parse_pairs(v, "override" if action == "positional_pairs"
                                else flag_of(sec_cls, f))
            values[f.name] = v
        sections[sec_name] = sec_cls(**values)
    return cls(**sections)
