# %% [markdown]
# # 5. Preferences: a reward model and DPO
#
# After SFT a model answers; preference finetuning teaches it which of its possible answers
# people (or a checker, or another model) prefer. The data are **pairs**: for a prompt, a
# *chosen* and a *rejected* response. Two ways to use them:
#
# - **RLHF's first half**: train a **reward model**, a language model whose head outputs
#   one number, so that the chosen response scores higher than the rejected one
#   (Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected)). Notebook 6 then optimises a
#   policy against it with reinforcement learning.
# - **DPO** (Rafailov et al., 2023) skips the reward model: it trains the policy directly on
#   the pairs, against a frozen copy of the starting model (the *reference*). Its *implicit
#   reward* of a response y is beta * (log pi(y|x) - log pi_ref(y|x)), and its loss is
#   -log sigmoid(reward(chosen) - reward(rejected)).
#
# This notebook first makes an SFT model (as in notebook 4, shorter), then does both.

# %% tags=["parameters"]
SMALL = False

# %%
# Sizes, derived from SMALL here rather than in the parameters cell: a runner (papermill,
# CI) sets SMALL in a cell of its own after that one.
SFT_STEPS = 160 if SMALL else 300    # SFT of the starting model (batch 32)
RM_STEPS = 20 if SMALL else 150      # reward-model steps (batch 16 pairs)
DPO_STEPS = 20 if SMALL else 100     # DPO steps (batch 16 pairs)
EVAL_EXAMPLES = 64 if SMALL else 128

# %% [markdown]
# ## The starting point: an SFT model

# %%
import json
import math
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
    "optim": {"lr": 1e-2, "warmup": 20},
    "eval": {"every": 0, "examples": EVAL_EXAMPLES, "batches": 1, "show": 0, "at_start": False},
    "checkpoint": {"save_every": SFT_STEPS},
    "run": {"workdir": "runs/sft", "steps": SFT_STEPS, "log_every": 20, "progress": False},
}))
print(f"SFT: {time.perf_counter() - t0:.0f} s, held-out exact match "
      f"{sft_summary['eval_exact_match']:.2f}")

# %% [markdown]
# ## Preference data in TRL's format
#
# fmzoo reads preference JSONL as TRL writes it: `{"prompt", "chosen", "rejected"}`, each a
# string or a list of chat messages (an optional `"margin"` says how much better the chosen
# one is). The embedded tasks give pairs too: the right answer against a plausible wrong one
# that the task's checker confirms wrong (for reversal: two neighbouring letters swapped).
# Below, a few pairs of the training split, and the same pairs written to a JSONL file, the
# form your own data would take.

# %%
from fmzoo.train import pref_tasks, tasks

train_pairs = pref_tasks.examples(TASK["name"], "train", **TASK["options"])
for p in train_pairs[:3]:
    print(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}))
check = tasks.checker_for("reverse")
assert all(check(p, p["chosen"][0]["content"]) == 1.0 and
           check(p, p["rejected"][0]["content"]) == 0.0 for p in train_pairs[:200])
pref_tasks.write_jsonl(train_pairs[:8], "my_pairs.jsonl")
print(open("my_pairs.jsonl").readline().strip())

# %% [markdown]
# ## A reward model
#
# `fmzoo reward` (here `fmzoo.train.reward.reward`) starts from the SFT model, replaces the
# language-model head by a score head read at the response's last token, and trains on the
# pairs. Its held-out accuracy is the share of unseen pairs it orders correctly. A reward
# model must *check* an answer, which is a different skill from producing one: here it has
# to notice two swapped letters.

# %%
from fmzoo.train.reward import RewardSettings, reward

t0 = time.perf_counter()
rm_summary = reward(RewardSettings.from_dict({
    "model": {"source": "runs/sft"},
    "data": {**TASK, "batch_size": 16, "max_length": 36},
    "eval": {"every": max(RM_STEPS // 4, 1), "batches": 4},
    "checkpoint": {"save_every": RM_STEPS},
    "run": {"workdir": "runs/rm", "steps": RM_STEPS, "log_every": 5, "progress": False},
}))
rm_rows = read_metrics("runs/rm")
rm_evals = [r for r in rm_rows if "eval_accuracy" in r]
print(f"reward model: {time.perf_counter() - t0:.0f} s; held-out accuracy "
      + ", ".join(f"{r['eval_accuracy']:.2f} (step {r['step']})" for r in rm_evals))
rm = fmzoo.load("runs/rm")
held = pref_tasks.examples(TASK["name"], "test", **TASK["options"])[:4]
scores_c = fmzoo.score(rm.model, rm.params, rm.tokenizer, [p["prompt"] for p in held],
                       [p["chosen"] for p in held])
scores_r = fmzoo.score(rm.model, rm.params, rm.tokenizer, [p["prompt"] for p in held],
                       [p["rejected"] for p in held])
for p, c, r in zip(held, scores_c, scores_r):
    print(f"{p['prompt'][0]['content']!r}: chosen {p['chosen'][0]['content']!r} {c:+.2f}, "
          f"rejected {p['rejected'][0]['content']!r} {r:+.2f}")
assert rm_evals[-1]["eval_loss"] < rm_evals[0]["eval_loss"], rm_evals

# %% [markdown]
# ## DPO
#
# `fmzoo dpo` (here `fmzoo.train.dpo.dpo`) trains the SFT model on the same kind of pairs;
# the reference is the SFT model itself, frozen. Its metrics carry TRL's names:
# `rewards/chosen` and `rewards/rejected` (the implicit rewards), `rewards/margins` (their
# difference) and `rewards/accuracies` (the share of pairs whose chosen reward is higher).
#
# At step 1 the policy *is* the reference, so every implicit reward is 0 and the loss is
# exactly -log sigmoid(0) = log 2: a loss that starts elsewhere means the reference or the
# masks are wrong (a classic bug). The metrics logged at step k are those of the batch the
# k-th update was computed on, before that update.

# %%
from fmzoo.train.dpo import DPOSettings, dpo

t0 = time.perf_counter()
dpo_summary = dpo(DPOSettings.from_dict({
    "model": {"source": "runs/sft"},
    "data": {**TASK, "batch_size": 16, "max_length": 36},
    "dpo": {"beta": 0.1},
    "optim": {"lr": 5e-5, "warmup": 5},
    "eval": {"every": 0, "examples": EVAL_EXAMPLES, "batches": 4, "show": 0, "at_start": True},
    "checkpoint": {"save_every": DPO_STEPS},
    "run": {"workdir": "runs/dpo", "steps": DPO_STEPS, "log_every": 1, "progress": False},
}))
dpo_rows = read_metrics("runs/dpo")
train = [r for r in dpo_rows if "rewards/margins" in r]
evals = [r for r in dpo_rows if "eval_rewards/accuracies" in r]
print(f"DPO: {time.perf_counter() - t0:.0f} s")
print(f"step 1 loss {train[0]['loss']:.6f} (log 2 = {math.log(2):.6f})")
print("held-out: rewards/accuracies "
      f"{evals[0]['eval_rewards/accuracies']:.2f} -> {evals[-1]['eval_rewards/accuracies']:.2f},"
      f" exact match {evals[0]['eval_exact_match']:.2f} -> {evals[-1]['eval_exact_match']:.2f}")

k = max(len(train) // 5, 3)
first = {m: np.mean([r[m] for r in train[:k]]) for m in ("rewards/margins", "rewards/accuracies")}
last = {m: np.mean([r[m] for r in train[-k:]]) for m in ("rewards/margins", "rewards/accuracies")}
print(f"training pairs, first {k} steps -> last {k}: margins "
      f"{first['rewards/margins']:.4f} -> {last['rewards/margins']:.4f}, accuracies "
      f"{first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}")
print(f"log-probs of the chosen {train[0]['logps/chosen']:.3f} -> {train[-1]['logps/chosen']:.3f},"
      f" of the rejected {train[0]['logps/rejected']:.3f} -> {train[-1]['logps/rejected']:.3f}")
assert train[0]["step"] == 1 and abs(train[0]["loss"] - math.log(2)) < 1e-5, train[0]
assert train[0]["rewards/margins"] == 0.0 or abs(train[0]["rewards/margins"]) < 1e-6
assert last["rewards/margins"] > first["rewards/margins"] + 0.01, (first, last)
assert last["rewards/accuracies"] > 0.6, last
assert evals[-1]["eval_rewards/accuracies"] > 0.5, evals[-1]

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
steps = [r["step"] for r in train]
for m in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    ax[0].plot(steps, [r[m] for r in train], label=m)
ax[0].axhline(0, color="gray", lw=0.5)
ax[0].set(xlabel="step", ylabel="implicit reward (nats x beta)", title="DPO rewards")
ax[0].legend(fontsize=8)
ax[1].plot(steps, [r["rewards/accuracies"] for r in train], label="rewards/accuracies")
ax[1].plot(steps, [r["loss"] for r in train], label="loss")
ax[1].axhline(math.log(2), color="gray", ls="--", lw=0.8, label="log 2")
ax[1].set(xlabel="step", title="DPO accuracy and loss")
ax[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What to take away
#
# - Preference data are pairs; the same JSONL trains a reward model or a DPO policy.
# - A reward model must learn to *verify*. This one orders held-out pairs better than chance
#   but far from perfectly, and its scores of two different prompts are not comparable; a
#   scorer this weak is what an RL policy learns to exploit (notebook 6).
# - DPO needs no reward model and no sampling: its loss starts at log 2, its implicit reward
#   margin grows, and the chosen answers become more likely relative to the rejected ones.
#   Both log-probabilities can fall together (the rejected faster), which is why a low
#   learning rate is used.
