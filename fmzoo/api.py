"""`fmzoo.load(...)`: one entry point for presets, training workdirs and Hugging Face dirs.

`dtype` means the same for every source: the compute dtype AND the param dtype (as
transformers' `torch_dtype` does), so `dtype="bfloat16"` gives bf16 params and bf16
activations whether the model is a preset, a workdir or a Hugging Face dir; None keeps the
source's own (float32 for presets and Hugging Face dirs, the stored config for a workdir).
`overrides` replace config fields; for a workdir or a Hugging Face dir, fields that would
change a parameter's shape are refused, since the stored weights fix them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

RUN_MARKER = "fmzoo_run.json"  # written at the root of every training workdir


def _check_fields(config_type: type, overrides: dict) -> None:
    """Refuses unknown config fields, naming the closest real ones."""
    from fmzoo.models.config import ConfigError

    names = [f.name for f in dataclasses.fields(config_type)]
    for key in sorted(overrides):
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = (f"did you mean {', '.join(close)}?" if close
                    else f"fields are {', '.join(sorted(names))}")
            raise ConfigError(f"{config_type.__name__} has no field {key!r}; {hint}")


def _with_dtype(dtype: str | None, overrides: dict) -> dict:
    if dtype is None:
        return overrides
    return {"dtype": dtype, "param_dtype": dtype, **overrides}


def source_kind(source: str) -> str:
    """'preset', 'workdir' or 'hf'; refuses anything else with the closest preset names."""
    from fmzoo.models import PRESETS, get_config
    from fmzoo.models.config import ConfigError

    if source in PRESETS:
        return "preset"
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, RUN_MARKER)):
            return "workdir"
        if os.path.exists(os.path.join(path, "config.json")):
            return "hf"
        raise ConfigError(
            f"{path!r} is neither a training workdir (no {RUN_MARKER}) nor a Hugging Face "
            "checkpoint directory (no config.json); pass a preset name, a workdir written by "
            "`fmzoo train`, or a directory saved with "
            "`save_pretrained(..., safe_serialization=True)`")
    try:
        get_config(source)  # raises with the closest preset names
    except ConfigError as e:
        raise ConfigError(f"{e}; or pass an existing directory (no such path: {path!r})") from None
    raise AssertionError("unreachable")


def load(source: str, *, mesh: Any = None, dtype: str | None = None, rng: Any = None,
         **overrides) -> "Loaded":  # noqa: F821 (fmzoo.models.bundle.Loaded)
    """Model, params, config and tokenizer from a preset name, a training workdir
    (latest checkpoint) or a Hugging Face checkpoint directory (config.json + safetensors).

    `mesh` places the params with the zoo's sharding rules. `dtype` sets the compute and the
    param dtype. `overrides` replace config fields (e.g. n_layers=2 for a preset,
    attention_impl="xla" or dropout=0.0 anywhere); unknown fields are refused with the
    closest names, and for a workdir or Hugging Face dir so is any field that changes a
    parameter's shape. `rng` (an int seed or a key; default 0) seeds the random init of a
    preset; it is refused for stored weights, which it could not change.
    The result's `.generation` (GenerationDefaults) holds the EOS id list and the sampling
    defaults of a Hugging Face dir's generation_config.json (greedy + the config's eos else).
    """
    from fmzoo.models.config import ConfigError, resolve_dtype

    if dtype is not None:
        resolve_dtype(dtype)  # an unknown dtype fails here, naming the valid ones
    kind = source_kind(source)
    if rng is not None and kind != "preset":
        raise ConfigError(f"rng seeds the random init of a preset, but {source!r} is a "
                          f"{'training workdir' if kind == 'workdir' else 'Hugging Face dir'} "
                          "with stored weights; drop rng")
    fields = dict(_with_dtype(dtype, overrides))
    if kind == "preset":
        from fmzoo.models import build, get_config, init
        from fmzoo.models.bundle import Loaded
        from fmzoo.models.tokenizer import ByteTokenizer

        _check_fields(type(get_config(source)), overrides)
        config = get_config(source, **fields)
        params = init(config, 0 if rng is None else rng)
        if mesh is not None:
            from fmzoo.models.registry import place_params
            params = place_params(params, config, mesh)
        return Loaded(build(config), params, config, ByteTokenizer(), source=source)
    path = os.path.expanduser(source)
    if kind == "workdir":
        from fmzoo.models.workdir import load_workdir, read_run_file

        stored = read_run_file(path)["config"]  # a PPO workdir's fields: its policy's
        _check_fields(type(getattr(stored, "policy", stored)), overrides)
        # scan_layers changes the params' layout, not the weights: load as stored, convert
        scan = fields.pop("scan_layers", None)
        return _scan_layout(load_workdir(path, mesh=mesh, **fields), scan, mesh)
    from fmzoo.models.config import LMConfig
    from fmzoo.models.hf import from_hf

    _check_fields(LMConfig, overrides)
    overrides = dict(overrides)
    scan = overrides.pop("scan_layers", None)
    return _scan_layout(from_hf(path, dtype=dtype or "float32",
                                compute_dtype=dtype or "float32", mesh=mesh,
                                overrides=overrides), scan, mesh)


def _scan_layout(loaded: Any, scan_layers: bool | None, mesh: Any) -> Any:
    if scan_layers is None:
        return loaded
    from fmzoo.models.scan import with_scan_layers
    return with_scan_layers(loaded, scan_layers, mesh)
