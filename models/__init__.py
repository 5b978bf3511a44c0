"""fmzoo.models: Flax modules, configs, the registry and sharding rules."""

from .hf import from_hf, to_hf
from .config import ConfigError, EncDecConfig, LMConfig, RNNConfig, config_from_dict, config_from_json
from .registry import (PRESETS, build, count_params, family_name, get_config, init, list_models,
                       logical_axes, param_shapes, place_params)
from .sharding import LOGICAL_AXIS_RULES, MESH_AXES, param_shardings

__all__ = [
    "from_hf", "to_hf", "ConfigError", "EncDecConfig", "LMConfig", "RNNConfig", "config_from_dict", "config_from_json",
    "PRESETS", "build", "count_params", "family_name", "get_config", "init", "list_models",
    "logical_axes", "param_shapes", "place_params", "LOGICAL_AXIS_RULES", "MESH_AXES", "param_shardings",
]
