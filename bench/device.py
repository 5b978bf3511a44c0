"""The --device check every bench script makes before measuring."""

from __future__ import annotations

import os

import fmzoo

# Imported before any jax call, so that fmzoo's host malloc tuning (fmzoo/_malloc.py) holds
# in every bench script; its state as the scripts report it: "on" or "off (why)".
HOST_MALLOC = "on" if fmzoo.HOST_MALLOC is None else f"off ({fmzoo.HOST_MALLOC})"


def device_mismatch(want: str) -> str | None:
    """The error for a run asked for `want` ('cpu', 'gpu' or 'any') while jax runs on another
    backend; None when it fits, or when FMZOO_BENCH_DRY rehearses a GPU script on the CPU."""
    import jax
    backend = jax.default_backend()
    if want in ("any", backend) or os.environ.get("FMZOO_BENCH_DRY"):
        return None
    return (f"error: --device {want} but jax's backend is {backend!r}; run where jax sees a "
            f"{want.upper()}, or pass --device any where the script has it")
