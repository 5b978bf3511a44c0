"""Layer scanning (`LMConfig.scan_layers`): one `nn.scan` over a decoder LM's blocks.

A scanned model keeps its blocks' params under one name, `layers`, every leaf with a leading
[n_layers] axis (logical name "layers", unsharded by the rules table), and compiles one block
instead of n_layers copies. An unscanned model keeps them as `layers_0 .. layers_{n-1}`.
`stack_layers` / `unstack_layers` convert a params tree between the two layouts (exactly:
stacking is a concatenation), and `match_layout` does so for a tree about to be loaded into
a model built from a config, or raises `ScanLayoutError` naming `scan_layers` and the fix.

Shape letters: N layers, B batch, L cache slots, K kv heads, D head dim.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STACKED = "layers"  # the scanned stack's params name (and its leading axis's logical name)
_LAYER = re.compile(r"^layers_(\d+)$")


class ScanLayoutError(ValueError):
    """A params tree whose layer layout (scanned or not) does not fit the model."""


def scan_blocks(block_cls: type[nn.Module], n_layers: int) -> type[nn.Module]:
    """`block_cls` (models/transformer.ScanBlock, possibly under `nn.remat`) scanned
    n_layers times: the carry is (residual stream, stacked cache or None), the scanned
    input is the layer index (for the cache slice on axis 1 of [B, N, L, K, D], so the
    batch stays leading), every other argument is shared by all layers."""
    b = nn.broadcast
    return nn.scan(block_cls, variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   # mask, positions, is_causal, layer, cache_index, cross_kv, cross_mask, det.
                   in_axes=(b, b, b, 0, b, b, b, b), length=n_layers,
                   metadata_params={nn.PARTITION_NAME: STACKED})


def _layer_keys(params: dict) -> list[str]:
    """layers_0 .. layers_{n-1} of an unscanned tree, in layer order."""
    found = sorted((int(m.group(1)), k) for k in params if (m := _LAYER.match(k)))
    return [k for _, k in found]


def is_stacked(params: Any) -> bool:
    return isinstance(params, dict) and STACKED in params


def stack_layers(params: dict, n_layers: int) -> dict:
    """{"layers_0": t0, ..., "layers_{n-1}": t_{n-1}, ...} -> {"layers": stack(t), ...}: the
    layout of a `scan_layers` model. Boxed (nn.Partitioned) leaves get "layers" prepended to
    their names. Other keys are kept as they are."""
    keys = _layer_keys(params)
    if keys != [f"layers_{i}" for i in range(n_layers)]:
        raise ScanLayoutError(f"stack_layers expects layers_0..layers_{n_layers - 1} at the top "
                              f"of the params, found {keys or 'none'}; is the tree already "
                              "stacked (scan_layers=True), or built for another n_layers?")

    def stack(*leaves):
        if isinstance(leaves[0], nn.Partitioned):
            return leaves[0].replace(value=jnp.stack([x.value for x in leaves]),
                                     names=(STACKED,) + tuple(leaves[0].names))
        return jnp.stack(leaves)
    try:
        stacked = jax.tree.map(stack, *(params[k] for k in keys),
                               is_leaf=lambda x: isinstance(x, nn.Partitioned))
    except ValueError as e:  # the layers' trees or shapes differ
        raise ScanLayoutError(f"cannot stack the layers: their params differ ({e})") from None
    out = {k: v for k, v in params.items() if k not in keys}
    out[STACKED] = stacked
    return out


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: {"layers": stacked} -> layers_0 .. layers_{n-1}."""
    if not is_stacked(params):
        raise ScanLayoutError("unstack_layers expects a scanned params tree (a `layers` entry "
                              "with a leading [n_layers] axis); this one is not stacked")
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    leaves, treedef = jax.tree.flatten(params[STACKED], is_leaf=is_box)
    n = (leaves[0].value if is_box(leaves[0]) else leaves[0]).shape[0]

    def layer(i, x):
        if is_box(x):
            return x.replace(value=x.value[i], names=tuple(x.names)[1:])
        return x[i]
    out = {k: v for k, v in params.items() if k != STACKED}
    for i in range(n):
        out[f"layers_{i}"] = treedef.unflatten([layer(i, x) for x in leaves])
    return out


def match_layout(params: Any, config: Any, convert: bool = True) -> Any:
    """`params` in the layer layout `config` builds (config.scan_layers), converting between
    the two layouts when `convert`, else raising ScanLayoutError naming the fix. Trees that
    are neither (a non-LM family, a LoRA {"base", "lora"} pair) are returned unchanged."""
    scanned = bool(getattr(config, "scan_layers", False))
    if not isinstance(params, dict):
        return params
    stacked, flat = is_stacked(params), bool(_layer_keys(params))
    if scanned and flat:
        if not convert:
            raise ScanLayoutError(
                "these params have one entry per layer (layers_0, layers_1, ...) but the model "
                "is built with scan_layers=True; convert them with "
                "fmzoo.models.scan.stack_layers(params, config.n_layers), or build the model "
                "with scan_layers=False")
        return stack_layers(params, config.n_layers)
    if stacked and not scanned:
        if not convert:
            raise ScanLayoutError(
                "these params are stacked for scan_layers=True (one `layers` entry with a "
                "leading [n_layers] axis) but the model is built with scan_layers=False; "
                "convert them with fmzoo.models.scan.unstack_layers(params), or build the "
                "model with scan_layers=True")
        return unstack_layers(params)
    return params


def with_scan_layers(loaded: Any, scan_layers: bool, mesh: Any = None) -> Any:
    """A `Loaded` (fmzoo.load's bundle) rebuilt with config.scan_layers = `scan_layers`, its
    params converted to that layout (and placed on `mesh` by the rules, when given)."""
    import dataclasses

    from .config import LMConfig
    from .registry import build, place_params

    config = loaded.config
    if not isinstance(config, LMConfig):
        raise ScanLayoutError(f"scan_layers is an option of decoder-only LMs (LMConfig); this "
                              f"is a {type(config).__name__}: drop scan_layers")
    if config.scan_layers == bool(scan_layers):
        return loaded
    new = config.replace(scan_layers=bool(scan_layers))
    params = match_layout(loaded.params, new)
    if mesh is not None:
        params = place_params(params, new, mesh)
    return dataclasses.replace(loaded, model=build(new), params=params, config=new)
