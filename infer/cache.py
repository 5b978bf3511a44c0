"""Row operations on any decode state (the models own the cache types, models/cache.py):
every leaf has the rows as its leading axis, which is what beam search relies on."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def gather_batch(tree: Any, index_B: jax.Array) -> Any:
    """Row index_B[i] of every leaf becomes row i (beam search reorders its beams so)."""
    return jax.tree.map(lambda x: jnp.take(x, index_B, axis=0), tree)


def repeat_batch(tree: Any, n: int) -> Any:
    """Each row repeated n times in place: [a, b] -> [a, a, b, b] along the leading axis."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)
