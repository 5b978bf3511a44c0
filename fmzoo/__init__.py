"""fmzoo: a JAX/Flax model zoo from RNN seq2seq to post-trained transformer LMs.

Names load on first use, so that `fmzoo --help` (which imports this package) never
imports jax.
"""

__version__ = "0.1.0"

from fmzoo import _malloc

# Before jax starts its CPU client: see fmzoo/_malloc.py (None when applied, else why not).
HOST_MALLOC = _malloc.tune()

_LAZY = {
    "load": "fmzoo.api", "Loaded": "fmzoo.models.bundle",
    "build": "fmzoo.models", "count_params": "fmzoo.models", "get_config": "fmzoo.models",
    "init": "fmzoo.models", "list_models": "fmzoo.models",
    "score": "fmzoo.train.reward",  # a reward model's scores of (prompt, response) pairs
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["Loaded", "load", "build", "count_params", "get_config", "init", "list_models",
           "score", "__version__"]
