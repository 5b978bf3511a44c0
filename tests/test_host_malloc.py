"""fmzoo's host malloc tuning (fmzoo/_malloc.py): with it, a jitted call whose buffers are
larger than glibc's mmap threshold stops page-faulting them in on every call."""

import json
import os
import subprocess
import sys

import pytest

from fmzoo import _malloc

_PROBE = r"""
import json, resource, sys
import fmzoo
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (x * 2.0, jnp.sin(x).sum()))  # a 64 MiB output per call
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(34):  # the heap grows over the first calls, then now and then (fragments)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y, s = f(x)
    jax.block_until_ready(s)
    del y, s
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
faults = sorted(faults[10:])
print(json.dumps({"status": fmzoo.HOST_MALLOC, "faults_per_call": faults[len(faults) // 2]}))
"""


def _probe(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "FMZOO_HOST_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env={**base, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


GLIBC_ONLY = pytest.mark.skipif(not _malloc.glibc_linux(), reason=(
    "the tuning is glibc's mallopt; other platforms are left alone (test_off_elsewhere)"))


@GLIBC_ONLY
def test_large_buffers_are_reused_instead_of_faulted_in_each_call():
    off = _probe(FMZOO_HOST_MALLOC="0")
    on = _probe()
    assert off["status"] == "turned off by FMZOO_HOST_MALLOC=0"
    assert on["status"] is None
    pages = 4096 * 4096 * 4 / 4096
    # median minor page faults per call after warm-up: glibc maps the 64 MiB afresh each
    # call unless tuned
    assert off["faults_per_call"] > 0.5 * pages, off
    assert on["faults_per_call"] < 0.05 * pages, (on, off)


@pytest.mark.parametrize("env, reason", [
    ({"FMZOO_HOST_MALLOC": "0"}, "FMZOO_HOST_MALLOC=0"),
    ({"MALLOC_ARENA_MAX": "2"}, "already tuned"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "already tuned"),
    ({"JAX_PLATFORMS": "cuda,cpu"}, "accelerator"),
])
@GLIBC_ONLY
def test_it_stays_out_of_the_way(monkeypatch, env, reason):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert reason in _malloc.why_not()


@GLIBC_ONLY
def test_too_late_once_jax_started_its_cpu_client(monkeypatch):
    import jax
    jax.devices()  # the worker threads exist now, each with its own arena
    for k in ("FMZOO_HOST_MALLOC", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    assert "import fmzoo first" in _malloc.why_not()


@pytest.mark.skipif(_malloc.glibc_linux(), reason="this machine is Linux with glibc")
def test_off_elsewhere(monkeypatch):
    monkeypatch.delenv("FMZOO_HOST_MALLOC", raising=False)
    assert "not Linux with glibc" in _malloc.why_not()
