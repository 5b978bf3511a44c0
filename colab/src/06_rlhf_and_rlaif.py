# %% [markdown]
# # 6. Reinforcement learning from feedback: GRPO, PPO (RLHF) and AI feedback (RLAIF)
#
# DPO (notebook 5) learns from fixed pairs. Reinforcement learning lets the model learn from
# its **own samples**: it answers, a reward scores the answers, and the update makes
# well-scored answers more likely. The reward can be
#
# - a **verifier** (a task's checker: is the reversal right?), as in GRPO on maths and code;
# - a **reward model** trained on preferences (RLHF, with PPO, as InstructGPT did);
# - another **model's judgement** (RLAIF: AI feedback instead of human labels).
#
# All updates keep the policy near where it started: a clipped ratio of new to old
# probabilities, and a KL penalty to the frozen SFT model (the *reference*).
#
# This notebook makes an SFT model that is right part of the time, then runs GRPO with the
# checker as reward, PPO with a value model, the LM judge, and `fmzoo label`, which turns a
# policy's samples into preference pairs labelled by a judge.

# %% tags=["parameters"]
SMALL = False

# %%
# Sizes, derived from SMALL here rather than in the parameters cell: a runner (papermill,
# CI) sets SMALL in a cell of its own after that one.
SFT_STOP = 120                        # stop SFT (planned for 200 steps) part-way: a policy
                                      # that is right part of the time (see notebook 4)
GRPO_STEPS = 8 if SMALL else 40       # one rollout of 8 prompts x 8 samples per step
PPO_STEPS = 4 if SMALL else 32        # 4 updates per rollout of 32 prompts
LABEL_PROMPTS = 32 if SMALL else 128

# %% [markdown]
# ## The starting policy

# %%
import json
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import fmzoo
from fmzoo.train.metrics import read_metrics
from fmzoo.train.sft import SFTSettings, sft

print("jax", jax.__version__, "devices:", jax.devices())
TINY = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=64)
TASK = dict(name="tasks/reverse", options=dict(min_word=3, max_word=3))
t0 = time.perf_counter()
sft_summary = sft(SFTSettings.from_dict({
    "model": {"source": "gpt-tiny", "overrides": TINY},
    "data": {**TASK, "batch_size": 32, "max_length": 36},
    "optim": {"lr": 3e-3, "warmup": 20},
    "eval": {"every": SFT_STOP, "examples": 64, "batches": 1, "show": 0, "at_start": False},
    "checkpoint": {"save_every": SFT_STOP},
    "run": {"workdir": "runs/sft", "steps": 200, "log_every": 25, "progress": False},
}), stop_after=SFT_STOP)
print(f"SFT: {time.perf_counter() - t0:.0f} s, held-out exact match (greedy) "
      f"{sft_summary['eval_exact_match']:.2f}")

# %% [markdown]
# ## GRPO
#
# GRPO (Shao et al., 2024) samples G answers per prompt and scores each; an answer's
# *advantage* is its reward minus the mean of its group, divided by the group's standard
# deviation. No value model is needed: the group is the baseline. A group whose answers all
# score the same teaches nothing (every advantage is 0), so a reward that varies within a
# group is what drives learning. Metrics carry TRL's names (`reward`, `reward_std`, `kl`,
# `clip_ratio`, ...); the rewards are those of each step's own samples.
#
# First a dense reward, to see the mechanism at work: a reward function in TRL's signature
# `(prompts, completions, **columns) -> list[float]` (passed as `module:function`) that pays
# the share of ASCII characters in a completion. A random byte-level model writes about half
# ASCII, half invalid bytes, so every group has a spread of rewards.

# %%
import os
import sys

with open("my_rewards.py", "w") as f:
    f.write("def ascii_share(prompts, completions, **kwargs):\n"
            "    return [sum(ch < '\\x80' for ch in c) / max(len(c), 1) for c in completions]\n")
sys.path.insert(0, os.getcwd())
from fmzoo.train.grpo import GRPOSettings, grpo

t0 = time.perf_counter()
grpo(GRPOSettings.from_dict({
    "model": {"source": "llama-tiny", "overrides": dict(n_layers=1, d_model=32, n_heads=4,
                                                         n_kv_heads=2, d_ff=64, max_len=64)},
    "data": {**TASK, "batch_size": 32, "max_length": 36},
    "grpo": {"reward": "my_rewards:ascii_share", "num_generations": 4, "max_new_tokens": 8},
    "optim": {"lr": 3e-2, "warmup": 0},
    "eval": {"every": 0, "examples": 0, "at_start": False},
    "checkpoint": {"save_every": 12},
    "run": {"workdir": "runs/grpo_toy", "steps": 12, "log_every": 1, "progress": False},
}))
toy = [r for r in read_metrics("runs/grpo_toy") if "reward" in r and "loss" in r]
toy_first, toy_last = (float(np.mean([r["reward"] for r in rs])) for rs in (toy[:3], toy[-3:]))
print(f"GRPO on the dense reward: {time.perf_counter() - t0:.0f} s; mean reward, first 3 steps "
      f"{toy_first:.2f} -> last 3 steps {toy_last:.2f}")
assert toy_last > toy_first + 0.2, (toy_first, toy_last)

# %% [markdown]
# ## GRPO with the checker as reward
#
# Now the verifiable reward: `--reward checker` pays 1 for a right reversal and 0 otherwise,
# on the SFT policy. This reward is sparse: a policy whose greedy answer is right half of the
# time samples right answers far less often (the probability is spread over many letters),
# and many groups are all wrong. bench/RESULTS.md measured GRPO on this kind of policy: at
# best +4 to +5 points of held-out exact match in 120 steps, about two standard errors. In a
# notebook-sized run the reward moves little; what we check is the bookkeeping (the first
# update is made on the policy's own samples, so its KL to the reference is 0) and we look
# at the reward and the KL over the steps.

# %%
t0 = time.perf_counter()
grpo(GRPOSettings.from_dict({
    "model": {"source": "runs/sft"},
    "data": {**TASK, "batch_size": 64, "max_length": 36},
    "grpo": {"reward": "checker", "num_generations": 8, "max_new_tokens": 6,
             "temperature": 0.7, "beta": 0.04},
    "optim": {"lr": 3e-4, "warmup": 0},
    "eval": {"every": 0, "examples": 64, "max_new_tokens": 6, "show": 0, "at_start": True},
    "checkpoint": {"save_every": GRPO_STEPS},
    "run": {"workdir": "runs/grpo", "steps": GRPO_STEPS, "log_every": 1, "progress": False},
}))
grpo_rows = read_metrics("runs/grpo")
g_train = [r for r in grpo_rows if "reward" in r and "loss" in r]
g_eval = [r for r in grpo_rows if "eval_exact_match" in r]
k = max(len(g_train) // 3, 2)
first, last = (float(np.mean([r["reward"] for r in rs])) for rs in (g_train[:k], g_train[-k:]))
print(f"GRPO with the checker: {time.perf_counter() - t0:.0f} s; mean sampled reward, first "
      f"{k} steps {first:.2f} -> last {k} steps {last:.2f}; held-out exact match (greedy) "
      f"{g_eval[0]['eval_exact_match']:.2f} -> {g_eval[-1]['eval_exact_match']:.2f}")
assert abs(g_train[0]["kl"]) < 1e-4, g_train[0]   # the first rollout's policy is the reference
assert all(0.0 <= r["reward"] <= 1.0 for r in g_train)

# %% [markdown]
# ## PPO (RLHF) with a value model
#
# PPO (Schulman et al., 2017), as used for RLHF (Ouyang et al., 2022), samples one answer
# per prompt and learns a **value model** that predicts the return at each token; advantages
# come from GAE over the per-token rewards. The per-token reward is minus beta times the
# KL to the reference, plus the score at the last token. `fmzoo ppo --reward RM_DIR` scores
# with a reward model (as in notebook 5); here the checker is the score, because a reward
# model this small cannot verify a reversal (bench/RESULTS.md measured PPO over-optimising
# such a reward model). Metrics: `objective/scores`, `objective/kl`,
# `objective/rlhf_reward` (score minus the KL penalty), `policy/clipfrac_avg`, ...

# %%
from fmzoo.train.ppo import PPOSettings, ppo

t0 = time.perf_counter()
ppo_summary = ppo(PPOSettings.from_dict({
    "model": {"source": "runs/sft"},
    "data": {**TASK, "batch_size": 32, "max_length": 36},
    "ppo": {"reward": "checker", "value_model": "policy", "max_new_tokens": 6,
            "kl_coef": 0.05, "num_ppo_epochs": 4, "num_mini_batches": 1},
    "optim": {"lr": 3e-4, "warmup": 0},
    "eval": {"every": 0, "examples": 64, "max_new_tokens": 6, "show": 0, "at_start": False},
    "checkpoint": {"save_every": PPO_STEPS},
    "run": {"workdir": "runs/ppo", "steps": PPO_STEPS, "log_every": 1, "progress": False},
}))
p_train = [r for r in read_metrics("runs/ppo") if "objective/kl" in r]
print(f"PPO: {time.perf_counter() - t0:.0f} s")
for r in p_train[::4]:
    print(f"step {r['step']:3d}: objective/scores {r['objective/scores']:.2f}  "
          f"objective/kl {r['objective/kl']:.4f}  policy/clipfrac_avg "
          f"{r['policy/clipfrac_avg']:.3f}  loss/value_avg {r['loss/value_avg']:.4f}")
assert abs(p_train[0]["objective/kl"]) < 1e-4, p_train[0]  # first rollout: policy == reference
assert all(np.isfinite(r["objective/kl"]) for r in p_train)

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
ax[0].plot([r["step"] for r in toy], [r["reward"] for r in toy], label="GRPO, dense reward")
ax[0].plot([r["step"] for r in g_train], [r["reward"] for r in g_train], label="GRPO, checker")
ax[0].plot([r["step"] for r in p_train], [r["objective/scores"] for r in p_train],
           label="PPO objective/scores")
ax[0].set(xlabel="step", ylabel="mean reward of the samples", title="reward")
ax[0].legend(fontsize=8)
ax[1].plot([r["step"] for r in g_train], [r["kl"] for r in g_train], label="GRPO kl (k3, per token)")
ax[1].plot([r["step"] for r in p_train], [r["objective/kl"] for r in p_train],
           label="PPO objective/kl (sequence)")
ax[1].set(xlabel="step", ylabel="KL to the reference", title="KL")
ax[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## An LM judge (AI feedback)
#
# RLAIF asks a language model which of two answers is better. fmzoo's `LMJudge` shows the
# judge a fixed template with the prompt and both answers, and reads the probabilities of
# the next token "1" and "2". Models prefer a position, so the judge asks twice, with the
# answers swapped, and averages (Lee et al., 2023): swapping the answers then gives exactly
# 1 - p. The untrained judge below shows the bias plainly: it says "1" a little more often
# whatever the answers are, and the average over both orders removes that preference. Below the judge is an untrained `llama-tiny`: its verdicts are noise, but the
# mechanics are those of a real judge (pass a Hugging Face chat model's directory to
# `fmzoo label --judge` for a useful one). bench/RESULTS.md records that even a tiny judge
# finetuned on `tasks/judge` stayed at chance; judging needs a larger model.

# %%
from fmzoo.train import pref_tasks
from fmzoo.train.judges import LMJudge, agreement, load_judge

judge_lm = fmzoo.load("llama-tiny", n_layers=2)
judge = LMJudge(judge_lm.model, judge_lm.params, judge_lm.tokenizer)
pairs = pref_tasks.examples(TASK["name"], "test", **TASK["options"])[:16]
prompts = [p["prompt"][0]["content"] for p in pairs]
right = [p["chosen"][0]["content"] for p in pairs]
wrong = [p["rejected"][0]["content"] for p in pairs]
p_ab = judge.probabilities(prompts, right, wrong)
p_ba = judge.probabilities(prompts, wrong, right)
rows = judge.label_probs(judge._rows(prompts[0], right[0], wrong[0]))
print(f"P('1'), P('2') in the two orders of the first pair:\n{rows}")
print("P(first better), both orders averaged:", np.round(p_ab[:6], 3))
np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-5)   # swapping gives 1 - p
np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)  # P('1') + P('2') = 1
checker_judge = load_judge("tasks/reverse")
agree = agreement(judge, checker_judge, prompts, right, wrong)
# an untrained judge may favour a position whatever the answers; the two orders cancel it
print(f"agreement of the untrained LM judge with the checker: {agree['agreement']:.2f} "
      f"on {agree['pairs']} pairs")

# %% [markdown]
# ## `fmzoo label`: preference pairs from a policy's samples (RLAIF)
#
# `fmzoo label --model POLICY --judge J --data PROMPTS --out pairs.jsonl` samples two
# answers per prompt, asks the judge, and writes TRL preference JSONL with the judge's
# probability (`chosen_probability`); ties (both right, or both wrong, for the checker) are
# skipped. The result trains `fmzoo dpo` or `fmzoo reward` as in notebook 5. With the
# checker as judge this is RL from a verifier; with an LM judge it is RLAIF.
#
# The sampling temperature decides how many pairs come out. This policy usually gets the
# first two letters right and hesitates over the last: at temperature 0.2 the two samples
# of a prompt often differ only there, one right and one wrong, which is a pair; at 0.7 the
# early letters already go astray, both answers are wrong and the prompt is a tie.

# %%
from fmzoo.train.label import label

out = label("runs/sft", "tasks/reverse", TASK["name"], "pairs.jsonl", max_new_tokens=6,
            max_length=36, temperature=0.2, limit=LABEL_PROMPTS,
            data_options=TASK["options"], progress=False)
print({k: out[k] for k in ("prompts", "pairs", "ties")})
with open("pairs.jsonl") as f:
    records = [json.loads(line) for line in f]
for r in records[:3]:
    print(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected", "chosen_probability")}))
from fmzoo.train import tasks


def text(x):  # a response is a string or a list of chat messages, like its prompt
    return x if isinstance(x, str) else x[-1]["content"]


check = tasks.checker_for("reverse")
assert out["pairs"] == len(records) > 0
assert out["pairs"] + out["ties"] + out["empty"] == out["prompts"]
# the checker as judge: every written pair is a right answer over a wrong one
assert all(check(r, text(r["chosen"])) == 1.0 and check(r, text(r["rejected"])) == 0.0
           for r in records)

# %% [markdown]
# ## What to take away
#
# - GRPO needs rewards that differ within a group: a dense reward rises within a dozen
#   steps, while a 0/1 checker on a weak policy gives a sparse signal that moves slowly;
#   the KL to the reference shows how far the policy moved.
# - PPO adds a value model and a per-token KL penalty; its reward is only as good as the
#   scorer it climbs (a weak reward model is exploited, see bench/RESULTS.md).
# - An LM judge is position-debiased by asking in both orders; its verdicts are worth
#   what the judging model is worth, and `fmzoo label` turns any judge into preference data.
