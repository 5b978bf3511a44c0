"""Reward sources for online RL, each a function with TRL's reward-function signature

    reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]

where kwargs carry the data's extra columns per row (e.g. answer=[...], task=[...]) and
has_eos=[...]. `--reward` names one or several, with weights:

    --reward checker                       the embedded task's checker (row's "task" column)
    --reward tasks/add                     the checker of one embedded task
    --reward mymod:my_reward               any importable function with the signature above
    --reward tasks/add:1.0,mymod:fn:0.5    a weighted sum (weight 1 when left out)

A reward-model workdir and a judge plug in as further sources through `register_source`
(a name, a test that recognises the spec, a builder); nothing here needs changing for them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Sequence

import numpy as np

RewardFn = Callable[..., Sequence[float]]
_WEIGHT = re.compile(r"^(?P<source>.+?):(?P<weight>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


class RewardError(ValueError):
    """A reward spec that cannot be built, or a reward function that misbehaves."""


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    matches: Callable[[str], bool]
    build: Callable[[str], RewardFn]


_SOURCES: list[_Source] = []


def register_source(name: str, matches: Callable[[str], bool],
                    build: Callable[[str], RewardFn], *, first: bool = True) -> None:
    """Adds a reward source (e.g. a reward-model workdir, a judge): `matches(spec)` says
    whether a --reward entry is one of these, `build(spec)` returns the reward function.
    Sources registered later are tried first unless first=False."""
    source = _Source(name, matches, build)
    _SOURCES.insert(0, source) if first else _SOURCES.append(source)


# ------------------------------------------------------------------------- the sources


def task_reward(name: str | None = None) -> RewardFn:
    """The embedded tasks' checker as a reward: 1.0 for an exact match, else 0.0. With a
    name ('add', 'tasks/add', 'tasks/mix') that task's checker; without, each row's `task`
    column picks it. The row's `answer` column is used when present, else the answer is
    solved from the prompt."""
    from . import tasks
    fixed = tasks.checker_for(name) if name else None

    def reward(prompts, completions, answer=None, task=None, **_):
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if fixed is None and (task is None or not task[i]):
                raise RewardError("the 'checker' reward needs each row's task (a 'task' "
                                  "column); name the task instead, e.g. --reward tasks/add")
            check = fixed or tasks.checker_for(task[i])
            example = {"prompt": p} if answer is None else {"prompt": p, "answer": answer[i]}
            out.append(float(check(example, c)))
        return out
    reward.__name__ = f"checker_{name.replace('/', '_')}" if name else "checker"
    return reward


def function_reward(spec: str) -> RewardFn:
    """'module:function' -> the function, imported now so a typo fails before training."""
    from .sft import import_function
    return import_function(spec, "--reward", "my_rewards:length_penalty", RewardError)


def _is_task(spec: str) -> bool:
    from . import tasks
    names = tasks.embedded_names()
    return spec == "checker" or spec in names or f"{tasks.PREFIX}{spec}" in names


def _build_task(spec: str) -> RewardFn:
    from . import tasks
    if spec == "checker":
        return task_reward()
    return task_reward(spec if spec.startswith(tasks.PREFIX) else f"{tasks.PREFIX}{spec}")


register_source("function", lambda s: ":" in s, function_reward)
register_source("task", _is_task, _build_task)  # before "function": 'tasks/add' has no colon


# --------------------------------------------------------------------------- parsing


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'a:0.5,b' -> [('a', 0.5), ('b', 1.0)]; a trailing ':<number>' is the weight, so
    'mod:fn:0.5' is ('mod:fn', 0.5) and 'mod:fn' is ('mod:fn', 1.0)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError("--reward is empty: name a reward, e.g. --reward checker or "
                          "--reward my_rewards:fn")
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise RewardError(f"--reward {spec!r} has an empty entry; separate rewards with "
                              "single commas, e.g. a:0.5,b:1.0")
        m = _WEIGHT.match(item)
        source, weight = (m["source"], float(m["weight"])) if m else (item, 1.0)
        if not math.isfinite(weight):
            raise RewardError(f"--reward entry {item!r}: the weight must be a finite number")
        out.append((source, weight))
    return out


def build_source(source: str) -> RewardFn:
    for s in _SOURCES:
        if s.matches(source):
            return s.build(source)
    raise RewardError(f"--reward {source!r} is not a known reward: use 'checker', an "
                      f"embedded task (e.g. tasks/add), or module:function")


# ------------------------------------------------------------------------ combination


@dataclasses.dataclass(frozen=True)
class Rewards:
    """Several reward functions with weights, and the missing-EOS penalty.

    Calling it is itself a TRL-style reward function (the weighted sum as list[float]);
    `score` also returns each function's rewards, for the rewards/<name>/mean metrics."""

    funcs: tuple[RewardFn, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]
    missing_eos_penalty: float | None = None

    def score(self, prompts: Sequence[str], completions: Sequence[str], *,
              has_eos: Sequence[bool] | None = None, **kwargs: Any
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total float32[N], {name: float32[N]}): sum_k w_k r_k, minus the penalty on rows
        without EOS (TRL: scores[~contain_eos] -= missing_eos_penalty)."""
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"{len(prompts)} prompts but {n} completions; pass one prompt "
                              "per completion")
        per: dict[str, np.ndarray] = {}
        total = np.zeros(n, np.float32)
        for fn, w, name in zip(self.funcs, self.weights, self.names):
            r = _call(fn, name, prompts, completions, has_eos=has_eos, **kwargs)
            per[name] = r
            total += np.float32(w) * r
        if self.missing_eos_penalty:
            if has_eos is None:
                raise RewardError("missing_eos_penalty needs has_eos (one bool per completion)")
            total -= np.float32(self.missing_eos_penalty) * ~np.asarray(has_eos, bool)
        return total, per

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.score(prompts, completions, **kwargs)[0].tolist()


def _call(fn: RewardFn, name: str, prompts, completions, **kwargs) -> np.ndarray:
    try:
        got = fn(list(prompts), list(completions), **kwargs)
    except RewardError:
        raise
    except Exception as e:  # the user's function: say which one failed, keep the cause
        raise RewardError(f"reward {name} raised {type(e).__name__}: {e}") from e
    if isinstance(got, np.ndarray):
        got = got.tolist()
    if not isinstance(got, Sequence) or isinstance(got, (str, bytes)):
        raise RewardError(f"reward {name} returned {type(got).__name__}; return a list of "
                          "floats, one per completion")
    if len(got) != len(completions):
        raise RewardError(f"reward {name} returned {len(got)} rewards for {len(completions)} "
                          "completions; return one float per completion")
    bad = [x for x in got if not isinstance(x, numbers.Real) or isinstance(x, bool)
           or not math.isfinite(x)]
    if bad:
        raise RewardError(f"reward {name} returned {bad[0]!r}; every reward must be a finite "
                          "number (None is not supported: return 0.0)")
    return np.asarray(got, np.float32)


def load_rewards(spec: str | Sequence[RewardFn], *, missing_eos_penalty: float | None = None
                 ) -> Rewards:
    """A --reward string (see the module notes) or a list of reward functions -> Rewards.
    Every source is built now, so a typo fails before any rollout."""
    if missing_eos_penalty is not None and not (
            isinstance(missing_eos_penalty, numbers.Real) and math.isfinite(missing_eos_penalty)):
        raise RewardError(f"missing_eos_penalty must be a finite number, got "
                          f"{missing_eos_penalty!r}")
    if callable(spec):
        spec = [spec]
    if isinstance(spec, str):
        items = parse_reward_spec(spec)
        funcs = tuple(build_source(s) for s, _ in items)
        names, weights = tuple(s for s, _ in items), tuple(w for _, w in items)
    else:
        funcs = tuple(spec)
        if not funcs or not all(callable(f) for f in funcs):
            raise RewardError("rewards must be a --reward string or a non-empty list of "
                              "functions (prompts, completions, **kwargs) -> list[float]")
        names = tuple(getattr(f, "__name__", f"reward{i}") for i, f in enumerate(funcs))
        weights = (1.0,) * len(funcs)
    if len(set(names)) != len(names):
        raise RewardError(f"--reward names the same reward twice ({', '.join(names)}); give "
                          "each once with its weight")
    return Rewards(funcs, weights, names, missing_eos_penalty)


from . import reward_sources  # noqa: E402,F401  (registers the reward-model and judge sources)
