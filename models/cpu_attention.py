"""Fused attention for XLA:CPU: a custom call (models/kernels/cpu_attention.cc) per direction.

XLA:CPU runs attention as batched [T, D] x [D, S] dots far below the machine's matmul rate,
with layout copies around them and the [B, H, T, S] scores written out; for a small GPT this
is the largest part of a training step (docs/performance.md). The kernel does each (batch,
head) pair as one task on XLA's intra-op thread pool with its score rows in cache, and the
backward recomputes the probabilities from the saved log-sum-exp.

The C++ source (with kernels/simd.h) is compiled with the host compiler on first use (a few
seconds, once per machine: the result is cached under ~/.cache/fmzoo/kernels keyed by the
source, jaxlib and CPU) and registered with `jax.ffi`. 'auto' picks it for fp32 on a
one-device CPU run (FMZOO_CPU_ATTENTION=0 keeps 'auto' on XLA's attention); select it
explicitly with attention_impl='cpu'. Without a compiler, `available()` is False, 'auto'
stays on XLA and 'cpu' raises a clear error.

Scope: fp32; causal (T == S) or not; a boolean mask shared by the heads (padding, packed
segments); any number of heads with K | H.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_SOURCE = Path(__file__).with_name("kernels") / "cpu_attention.cc"
_FWD, _BWD = "fmzoo_cpu_attention_fwd", "fmzoo_cpu_attention_bwd"


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fmzoo" / "kernels"


def _cpu_flags() -> str:
    try:  # -march=native code must not run on another CPU: key the build by its features
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _build() -> Path:
    """The compiled library, built once per (source, jaxlib, CPU) under a file lock."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++ or clang++; or set CXX)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in sorted(_SOURCE.parent.glob("*.[ch]*"))),
                 jax.__version__.encode(), cxx.encode(),
                 platform.machine().encode(), _cpu_flags().encode(),
                 (Path(include) / "xla/ffi/api/c_api.h").read_bytes()):
        key.update(part)
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    import fcntl  # POSIX; elsewhere the ImportError turns the kernel off

    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
               f"-I{include}", str(_SOURCE), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            os.replace(tmp, lib)  # atomic: nobody loads a half-written library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Builds and registers the kernel once per process; returns why not, or None."""
    import ctypes

    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        return str(e)
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.FmzooAttentionFwd), platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.FmzooAttentionBwd), platform="cpu")
    return None


def available() -> bool:
    """Whether the kernel is built and registered (building it if needed)."""
    return _load() is None


def auto_enabled() -> bool:
    """Whether attention 'auto' may pick the kernel: unless FMZOO_CPU_ATTENTION=0, and only
    when it could be built. Its results differ from XLA's by float rounding (~1e-7)."""
    flag = os.environ.get("FMZOO_CPU_ATTENTION", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"FMZOO_CPU_ATTENTION must be 0 (attention 'auto' stays on XLA) or 1 "
                         f"(the default: the fused CPU kernel where it applies), got {flag!r}")
    return flag == "1" and available()


def why_not(q_BTHD: Array, k_BSKD: Array) -> str | None:
    """Why the kernel cannot run for these inputs at all, or None."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU only (the backend is {jax.default_backend()!r})"
    if q_BTHD.dtype != jnp.float32 or k_BSKD.dtype != jnp.float32:
        return f"it takes float32 only (got {q_BTHD.dtype})"
    if q_BTHD.shape[2] % k_BSKD.shape[2]:
        return f"kv heads ({k_BSKD.shape[2]}) must divide query heads ({q_BTHD.shape[2]})"
    return _load()


def unfit(q_BTHD: Array, k_BSKD: Array, mask: Array | None, is_causal: bool) -> str | None:
    """Why the kernel does not take this call (XLA's attention does), or None when it does:
    causal needs T == S, and a mask must be the same for every head, [B or 1, 1, T or 1, S]
    as padding and segment masks are."""
    if mask is not None and not (mask.ndim == 4 and mask.shape[1] == 1):
        return f"the mask must be [B, 1, T, S], the same for every head (got {mask.shape})"
    if is_causal and q_BTHD.shape[1] != k_BSKD.shape[1]:
        return (f"causal attention needs T == S (got q {q_BTHD.shape}, "
                f"k {k_BSKD.shape})")
    return None


def _call(name, outs, *args, causal: bool, masked: bool):
    scale = np.float32(1.0 / np.sqrt(args[0].shape[-1]))
    return jax.ffi.ffi_call(name, outs, vmap_method="broadcast_all")(
        *args, causal=bool(causal), masked=bool(masked), scale=scale)


def _forward(q, k, v, mask, causal, masked):
    *lead, T, H, _ = q.shape
    return _call(_FWD, (jax.ShapeDtypeStruct(q.shape, q.dtype),
                        jax.ShapeDtypeStruct((*lead, H, T), jnp.float32)),
                 q, k, v, mask, causal=causal, masked=masked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, causal, masked):
    return _forward(q, k, v, mask, causal, masked)[0]


def _attention_fwd(q, k, v, mask, causal, masked):
    out, lse = _forward(q, k, v, mask, causal, masked)
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(causal, masked, res, dout):
    q, k, v, mask, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    dq, dk, dv = _call(_BWD, shapes, q, k, v, mask, out, lse, dout.astype(out.dtype),
                       causal=causal, masked=masked)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, mask: Array | None = None, *,
                  is_causal: bool = False) -> Array:
    """softmax(Q K^T / sqrt(D)) V through the fused CPU kernel; differentiable.

    q [B, T, H, D], k and v [B, S, K, D] float32 with K dividing H; causal needs T == S.
    mask (True = may attend) broadcastable to [B, 1, T, S]: one for all heads. A query row
    that sees no key at all gets zeros (the reference gives the mean of the values there).
    """
    why = why_not(q_BTHD, k_BSKD) or unfit(q_BTHD, k_BSKD, mask, is_causal)
    if why is not None:
        raise ValueError(f"fmzoo's CPU attention kernel cannot run here: {why}")
    B, T, _, _ = q_BTHD.shape
    if mask is None:
        mask_BTS = jnp.zeros((1,), jnp.uint8)  # a placeholder the kernel does not read
    else:
        mask_BTS = jnp.broadcast_to(mask, (B, 1, T, k_BSKD.shape[1]))[:, 0].astype(jnp.uint8)
    return _attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, is_causal, mask is not None)
