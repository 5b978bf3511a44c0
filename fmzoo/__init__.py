"""fmzoo: a JAX/Flax model zoo from RNN seq2seq to post-trained transformer LMs."""

from fmzoo.api import load
from fmzoo.models import build, count_params, get_config, init, list_models
from fmzoo.models.bundle import Loaded

__version__ = "0.1.0"
__all__ = ["Loaded", "load", "build", "count_params", "get_config", "init", "list_models", "__version__"]
