"""Two more `--reward` sources (registered with train/rewards.register_source on import):

    --reward runs/rm              a reward-model workdir (`fmzoo reward`; its fmzoo_run.json
                                  model has head 'score'): reward = its score of (prompt,
                                  completion), as train/reward.score computes it
    --reward judge:SPEC           a pairwise judge (train/judges.load_judge: a model, a
                                  reward-model workdir, checker, tasks/NAME, module:function)
                                  as a pointwise reward: each completion's reward is its mean
                                  win probability against the OTHER completions of its prompt

A judge reward compares completions of one prompt, so it needs groups: the rollout code
passes `group_size=G` in the reward kwargs, with the rows of one prompt adjacent (rows
g*G .. g*G + G - 1). Without group_size, or with G < 2, it raises RewardError (a judge
reward needs fmzoo grpo's --num-generations >= 2). Every G*(G-1)/2 pair of a group is judged once (the LM
judge already averages both orders, so P(j beats i) = 1 - P(i beats j)).

Both follow TRL's reward-function signature (prompts, completions, **kwargs) -> list[float].
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .rewards import RewardError, RewardFn, register_source

JUDGE_PREFIX = "judge:"
_RUN_FILE = "fmzoo_run.json"  # models/workdir.RUN_FILE, without importing jax to match a spec


# ------------------------------------------------------------------- reward model


def reward_model_reward(model: Any, params: Any, tokenizer: Any, *, batch_size: int = 32,
                        max_length: int | None = None, name: str = "reward_model") -> RewardFn:
    """A reward model (config head 'score') as a TRL reward function: each completion's
    score given its prompt (a string, or messages; the completion then becomes an assistant
    message)."""
    from .judges import JudgeError, RewardModelJudge
    try:
        judge = RewardModelJudge(model, params, tokenizer, batch_size=batch_size,
                                 max_length=max_length)
    except JudgeError as e:
        raise RewardError(str(e)) from None

    def reward(prompts, completions, **_):
        return judge.rewards(prompts, completions).tolist()
    reward.__name__ = name
    return reward


def _is_workdir(spec: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(spec), _RUN_FILE))


def _build_workdir(spec: str) -> RewardFn:
    from fmzoo.models.workdir import read_run_file
    path = os.path.expanduser(spec)
    head = getattr(read_run_file(path)["config"], "head", None)
    if head != "score":
        raise RewardError(f"--reward {spec}: this workdir holds a language model, not a reward "
                          "model (no score head); train one with `fmzoo reward`, or use the LM "
                          f"as a judge: --reward judge:{spec}")
    import fmzoo
    loaded = fmzoo.load(path)
    if loaded.tokenizer is None:
        from fmzoo.models.tokenizer import ByteTokenizer
        loaded.tokenizer = ByteTokenizer()
    return reward_model_reward(loaded.model, loaded.params, loaded.tokenizer,
                               name=f"reward_model:{os.path.basename(path.rstrip('/'))}")


# ------------------------------------------------------------------------- judge


def judge_reward(judge: Any, name: str = "judge") -> RewardFn:
    """A pairwise judge as a pointwise reward (see the module notes): needs kwargs
    group_size >= 2 and groups of adjacent rows with the same prompt."""

    def reward(prompts, completions, group_size=None, **columns):
        n = len(completions)
        if group_size is None:
            raise RewardError(f"reward {name} compares the completions of one prompt, so it "
                              "needs group_size (completions per prompt) in its kwargs; use "
                              "it with fmzoo grpo --num-generations >= 2")
        if int(group_size) < 2:
            raise RewardError(f"reward {name}: a judge reward needs --num-generations >= 2 (it "
                              f"scores a completion against the others of its prompt), got "
                              f"group_size={group_size}; with one completion per prompt (fmzoo "
                              "ppo) use a reward-model workdir as --reward instead")
        G = int(group_size)
        if n % G:
            raise RewardError(f"reward {name}: {n} completions are not whole groups of "
                              f"group_size={G}")
        for g in range(0, n, G):
            if any(prompts[g + k] != prompts[g] for k in range(1, G)):
                raise RewardError(f"reward {name}: rows {g}..{g + G - 1} should answer one "
                                  "prompt (a group's rows are adjacent) but their prompts "
                                  "differ")
        pairs = [(g + i, g + j) for g in range(0, n, G) for i in range(G) for j in range(i + 1, G)]
        first, second = zip(*pairs)
        p = judge.probabilities([prompts[i] for i in first], [completions[i] for i in first],
                                [completions[j] for j in second],
                                **{k: [v[i] for i in first] for k, v in columns.items()
                                   if isinstance(v, (list, tuple, np.ndarray)) and len(v) == n})
        wins = np.zeros(n, np.float64)
        for (i, j), p_ij in zip(pairs, np.asarray(p, np.float64)):
            wins[i] += p_ij
            wins[j] += 1.0 - p_ij
        return (wins / (G - 1)).tolist()
    reward.__name__ = name
    return reward


def _build_judge(spec: str) -> RewardFn:
    from .judges import JudgeError, load_judge
    inner = spec[len(JUDGE_PREFIX):]
    if not inner:
        raise RewardError("--reward judge: names no judge; write judge:MODEL (a preset, "
                          "workdir or HF dir), judge:tasks/add or judge:module:function")
    try:
        judge = load_judge(inner)
    except JudgeError as e:
        raise RewardError(f"--reward {spec}: {e}") from None
    return judge_reward(judge, name=spec)


register_source("reward_model", _is_workdir, _build_workdir)
register_source("judge", lambda s: s.startswith(JUDGE_PREFIX), _build_judge)
