"""`fmzoo.load(...)`: one entry point for presets, training workdirs and Hugging Face dirs."""

from __future__ import annotations

import os
from typing import Any

from fmzoo.models import PRESETS, build, get_config, init
from fmzoo.models.bundle import Loaded
from fmzoo.models.config import ConfigError
from fmzoo.models.tokenizer import ByteTokenizer

RUN_MARKER = "fmzoo_run.json"  # written at the root of every training workdir


def load(source: str, *, mesh: Any = None, dtype: str | None = None, rng: int = 0,
         **overrides) -> Loaded:
    """Model, params, config and tokenizer from a preset name, a training workdir
    (latest checkpoint) or a Hugging Face checkpoint directory (config.json + safetensors).

    `mesh` places the params with the zoo's sharding rules; `dtype` sets the param dtype;
    `overrides` replace config fields of a preset (e.g. n_layers=2).
    """
    if source in PRESETS:
        if dtype is not None:
            overrides["param_dtype"] = dtype
        config = get_config(source, **overrides)
        params = init(config, rng)
        if mesh is not None:
            from fmzoo.models.sharding import place_params
            params = place_params(params, config, mesh)
        return Loaded(build(config), params, config, ByteTokenizer(), source=source)
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, RUN_MARKER)):
            from fmzoo.train.checkpoint import load_workdir
            return load_workdir(path, mesh=mesh)
        if os.path.exists(os.path.join(path, "config.json")):
            from fmzoo.models.hf import from_hf
            return from_hf(path, dtype=dtype or "float32", mesh=mesh)
        raise ConfigError(
            f"{path!r} is neither a training workdir (no {RUN_MARKER}) nor a Hugging Face "
            "checkpoint directory (no config.json); pass a preset name, a workdir written by "
            "`fmzoo train`, or a directory saved with `save_pretrained(..., safe_serialization=True)`")
    try:
        get_config(source)  # raises with the closest preset names
    except ConfigError as e:
        raise ConfigError(f"{e}; or pass an existing directory (no such path: {path!r})") from None
    raise AssertionError("unreachable")
