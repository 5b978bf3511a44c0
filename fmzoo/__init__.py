"""fmzoo: a JAX/Flax model zoo from RNN seq2seq to post-trained transformer LMs."""

from fmzoo.models import build, count_params, get_config, init, list_models

__version__ = "0.1.0"
__all__ = ["build", "count_params", "get_config", "init", "list_models", "__version__"]
