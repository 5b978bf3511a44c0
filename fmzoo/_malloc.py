"""Keep XLA:CPU's per-step scratch memory mapped from one step to the next.

XLA:CPU allocates an executable's temporary buffer (activations kept for the backward
pass, gradients: 107 MB for gpt-tiny at batch 16 x 128) with posix_memalign on one of its
worker threads, and frees it when the step ends. glibc serves an allocation that large in
a worker thread's arena with a fresh mmap every time (a non-main arena cannot grow past
64 MB, and then falls back to mmap whatever M_MMAP_MAX says), so every step page-faults
the whole buffer in again: about 30,000 minor faults and 100 ms of kernel time per
gpt-tiny step on two cores, a fifth of the step. With one arena, no mmap and a high trim
threshold, the buffer comes from the heap and is reused: after warm-up most steps take
no fault at all.

This must happen before jax starts its CPU client (that is when the worker threads pick
their arena), hence at `import fmzoo`. It touches nothing else: it runs only on Linux with
glibc, only when no GPU plugin is installed and JAX_PLATFORMS does not name an
accelerator, never when the user already tuned malloc (MALLOC_ARENA_MAX, GLIBC_TUNABLES),
and FMZOO_HOST_MALLOC=0 turns it off. It imports neither jax nor numpy.
"""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of freed heap


def _accelerator_possible() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    import importlib.util
    spec = importlib.util.find_spec("jax_plugins")  # where jax's GPU/TPU plugins install
    return bool(spec and any(os.listdir(p) for p in spec.submodule_search_locations or ()
                             if os.path.isdir(p)))


def glibc_linux() -> bool:
    """Linux with glibc: the only place where mallopt and these settings mean something."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


def why_not() -> str | None:
    """Why the tuning does not apply in this process, or None when it does."""
    if os.environ.get("FMZOO_HOST_MALLOC", "1") == "0":
        return "turned off by FMZOO_HOST_MALLOC=0"
    if not glibc_linux():
        return f"not Linux with glibc ({sys.platform})"
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "malloc already tuned by the environment (MALLOC_ARENA_MAX or GLIBC_TUNABLES)"
    if _accelerator_possible():
        return "an accelerator plugin is installed or named by JAX_PLATFORMS"
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and getattr(bridge, "_backends", None):
        return ("jax's backends started before fmzoo was imported (import fmzoo first: the "
                "worker threads choose their malloc arena when the CPU client starts)")
    return None


def tune() -> str | None:
    """Apply the tuning if it applies; returns why not, or None when applied."""
    reason = why_not()
    if reason is not None:
        return reason
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "mallopt not found"
    # Order matters: one arena first, so the worker threads created later share the heap.
    ok = (mallopt(M_ARENA_MAX, 1) == 1 and mallopt(M_MMAP_MAX, 0) == 1
          and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return None if ok else "mallopt refused a setting"
