"""8 simulated CPU devices for every test; set before jax is imported anywhere. A shared
persistent compilation cache: many tests (and their CLI subprocesses, which inherit the
environment) compile the very same tiny programs, which then compile once per session."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fmzoo-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

_TOY_REWARDS = '''
def ascii_share(prompts, completions, **kwargs):
    return [sum(ch < "\\x80" for ch in c) / max(len(c), 1) for c in completions]


def wrong_length(prompts, completions, **kwargs):
    return [0.0]
'''


@pytest.fixture
def toy_reward(tmp_path, monkeypatch):
    """An importable module of TRL-style reward functions for the online-RL tests:
    ascii_share rewards a completion's share of ASCII characters (about 0.5 for a random
    byte model, whose high bytes decode to U+FFFD: a dense signal); wrong_length misbehaves.
    Yields the module's name."""
    import sys
    (tmp_path / "toy_rl_rewards.py").write_text(_TOY_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toy_rl_rewards"
    sys.modules.pop("toy_rl_rewards", None)
