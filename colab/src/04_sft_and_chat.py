# %% [markdown]
# # 4. Supervised finetuning and chat
#
# A pretrained language model continues text; it does not answer. Post-training starts with
# **supervised finetuning (SFT)**: the model is shown conversations (a user's request, then
# a good assistant reply) and learns to produce the reply. Two details make this work:
#
# - a **chat template** turns a conversation into one token sequence, with markers that say
#   who speaks, so the model knows where a reply begins and where it must stop;
# - the loss counts only the **assistant's tokens** (completion-only loss): the model is not
#   asked to predict the user's words, only its own answer and the end of its turn.
#
# This notebook shows fmzoo's chat template and label mask, finetunes a tiny GPT from
# scratch on one of fmzoo's embedded instruction tasks (reversing a word), measures held-out
# exact match before and after, talks to the result, and adapts it with **LoRA**, where the
# base weights stay frozen and only two small matrices per layer learn.

# %% tags=["parameters"]
SMALL = False

# %%
# Sizes, derived from SMALL here rather than in the parameters cell: a runner (papermill,
# CI) sets SMALL in a cell of its own after that one.
SFT_STEPS = 200 if SMALL else 300      # optimizer steps of SFT (batch 32)
EVAL_EVERY = 50 if SMALL else 25       # steps between held-out evaluations
EVAL_EXAMPLES = 64 if SMALL else 128   # held-out prompts answered greedily
LORA_STEPS = 10 if SMALL else 60       # steps of the LoRA run

# %% [markdown]
# ## The chat template
#
# fmzoo's byte tokenizer has one id per byte plus a few special ids: BOS, EOS, and role
# markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`. A conversation becomes BOS,
# then for each message its role marker, its text as bytes and `<|end|>`. To ask for a reply,
# the prompt ends with a bare `<|assistant|>` (the *generation prompt*). Hugging Face
# checkpoints bring their own jinja2 template, which fmzoo renders the way transformers does.
#
# `encode_messages` also returns the label mask: True exactly on the assistant's tokens and
# its `<|end|>`. Learning to emit `<|end|>` is what lets generation stop after the answer.

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import fmzoo
from fmzoo.infer import generate
from fmzoo.models.chat import apply_chat_template, encode_messages, end_of_turn_ids
from fmzoo.models.tokenizer import ByteTokenizer

print("jax", jax.__version__, "devices:", jax.devices())
tok = ByteTokenizer()
conversation = [{"role": "user", "content": "Reverse the word 'cat'."},
                {"role": "assistant", "content": "tac"}]
ids, mask = encode_messages(tok, conversation)


def show(i: int) -> str:
    special = {tok.bos_id: "<bos>", tok.eos_id: "<eos>"}
    special.update({tok.role(r): f"<|{r}|>" for r in ("system", "user", "assistant")})
    return special.get(i) or ("<|end|>" if i in end_of_turn_ids(tok) else tok.decode([i]))


print(f"{len(ids)} tokens; labelled (trained on) are marked with ^")
print(" ".join(f"{show(i)}{'^' if m else ''}" for i, m in zip(ids, mask)))
prompt_ids = apply_chat_template(tok, conversation[:1], add_generation_prompt=True)
labelled = [i for i, m in zip(ids, mask) if m]
assert ids[:len(prompt_ids)] == prompt_ids          # the prompt is a prefix of the whole
assert not any(mask[:len(prompt_ids)])             # nothing of the prompt is labelled
assert tok.decode(labelled[:-1]) == "tac" and labelled[-1] in end_of_turn_ids(tok)

# %% [markdown]
# ## Finetuning on an embedded task
#
# fmzoo embeds a few *verifiable* instruction tasks (`tasks/add`, `tasks/sub`,
# `tasks/reverse`, `tasks/sort`, `tasks/count`, `tasks/mix`): each example is a prompt, its
# exact answer, and a checker that tells a right answer from a wrong one. The splits share no
# prompt, so the held-out exact match measures what the model learned, not what it memorised.
# We use `tasks/reverse` with three-letter words ("Reverse the word 'cat'." -> "tac").
#
# The model is a 2-layer GPT of width 64 (about 90 thousand parameters), initialised at random: the
# "base model" here knows nothing. SFT with the Trainer reports the loss and, at each
# evaluation, held-out exact match by greedy generation; step 0 is the base model.

# %%
from fmzoo.train.metrics import read_metrics
from fmzoo.train.sft import SFTSettings, sft

TINY = dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=64)
TASK = dict(name="tasks/reverse", options=dict(min_word=3, max_word=3))
t0 = time.perf_counter()
summary = sft(SFTSettings.from_dict({
    "model": {"source": "gpt-tiny", "overrides": TINY},
    "data": {**TASK, "batch_size": 32, "max_length": 36},
    # 3e-3 rather than 1e-2: at 1e-2 the step at which the model leaves the plateau below
    # moved by 100 steps when only float rounding changed (another attention kernel)
    "optim": {"lr": 3e-3, "warmup": 20},
    "eval": {"every": EVAL_EVERY, "examples": EVAL_EXAMPLES, "batches": 1, "show": 0},
    "checkpoint": {"save_every": SFT_STEPS},
    "run": {"workdir": "runs/sft", "steps": SFT_STEPS, "log_every": 10, "progress": False},
}))
sft_seconds = time.perf_counter() - t0
rows = read_metrics("runs/sft")
evals = [r for r in rows if "eval_exact_match" in r]
before, after = evals[0]["eval_exact_match"], evals[-1]["eval_exact_match"]
print(f"SFT: {SFT_STEPS} steps in {sft_seconds:.0f} s; held-out exact match "
      f"{before:.2f} (base model, step {evals[0]['step']}) -> {after:.2f} (step {evals[-1]['step']})")
assert evals[0]["step"] == 0 and before == 0.0, evals[0]   # the random base answers nothing
assert after >= before + 0.5, (before, after)

# %% [markdown]
# The loss falls quickly to a plateau (the model has learned the format: a few letters, then
# `<|end|>`) and then drops again when it finds *which* letters to copy; held-out exact match
# jumps at that moment.

# %%
train = [r for r in rows if "loss" in r]
fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
ax[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
ax[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
ax[0].set(xlabel="step", ylabel="loss (nats / labelled token)", yscale="log", title="SFT loss")
ax[0].legend()
ax[1].plot([r["step"] for r in evals], [r["eval_exact_match"] for r in evals], "o-")
ax[1].set(xlabel="step", ylabel="exact match", ylim=(-0.05, 1.05),
          title="held-out exact match (greedy)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Chat with it
#
# `fmzoo.load` reads the workdir (model, params, tokenizer). A reply is generated after the
# generation prompt and stops at `<|end|>`; `fmzoo chat --model runs/sft` does the same in a
# terminal, streaming the reply and keeping the history. The words below never appeared in
# training (the task's test split). This model knows one skill only: anything else gets a
# confident, meaningless reply, a reminder that SFT teaches a format and the skills that are
# in the data, nothing more.

# %%
from fmzoo.train import sft_data

chat = fmzoo.load("runs/sft")
eos = end_of_turn_ids(chat.tokenizer)
held_out = sft_data.sft_eval_prompts(TASK["name"], chat.tokenizer, split="test", n=6,
                                     **TASK["options"])


def reply(user_texts):
    prompts = [apply_chat_template(chat.tokenizer, [{"role": "user", "content": t}],
                                   add_generation_prompt=True) for t in user_texts]
    outs = generate(chat.model, chat.params, prompts, max_new_tokens=8, eos_id=eos)
    return [chat.tokenizer.decode([t for t in o if t not in eos]) for o in outs]


questions = [e["prompt_text"] for e in held_out]
answers = reply(questions)
for q, a, e in zip(questions, answers, held_out):
    print(f"user: {q}\nassistant: {a}   [{'right' if a == e['answer'] else 'wrong'}]\n")
print("user: What is 2+2?\nassistant:", repr(reply(["What is 2+2?"])[0]))
assert sum(a == e["answer"] for a, e in zip(answers, held_out)) >= 3, answers

# %% [markdown]
# ## LoRA: train two small matrices instead of the whole model
#
# LoRA (Hu et al., 2021) freezes every weight W and learns a low-rank update: for a kernel of
# shape [in, out] it trains A [in, R] and B [R, out] and uses W + (alpha / R) A B. B starts
# at zero, so the adapted model starts exactly as the base. Only the adapters need
# gradients and optimizer state. `fmzoo sft --lora-rank R` (here `"sft": {"lora_rank": 4}`)
# trains them; the workdir stores base and adapters apart, and `fmzoo.load` merges them.
#
# Here the adapters continue the SFT run for a few steps. The checks: the trainable share,
# the frozen base really unchanged in the checkpoint, and the merged model computing the
# same logits as the unmerged one (x W + scale (x A) B at every adapted layer).

# %%
import orbax.checkpoint as ocp

from fmzoo.models import lora as lora_lib
from fmzoo.models.registry import count_params
from fmzoo.models.workdir import committed_steps

SPEC = lora_lib.LoraSpec(rank=4, alpha=8.0)
lora_summary = sft(SFTSettings.from_dict({
    "model": {"source": "runs/sft"},
    "data": {**TASK, "batch_size": 32, "max_length": 36},
    "sft": {"lora_rank": SPEC.rank, "lora_alpha": SPEC.alpha},
    "optim": {"lr": 1e-2, "warmup": 2},
    "eval": {"every": 0, "examples": EVAL_EXAMPLES, "batches": 1, "show": 0, "at_start": False},
    "checkpoint": {"save_every": LORA_STEPS},
    "run": {"workdir": "runs/lora", "steps": LORA_STEPS, "log_every": 5, "progress": False},
}))
# the checkpoint holds {"base": frozen params, "lora": adapters}
step = committed_steps("runs/lora/checkpoints")[-1]
stored = ocp.StandardCheckpointer().restore(
    os.path.abspath(f"runs/lora/checkpoints/{step}/params"))
base, adapters = stored["base"], stored["lora"]
n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
n_full = count_params(chat.config)
print(f"trainable: {n_adapter:,} adapter weights vs {n_full:,} in the model "
      f"({100 * n_adapter / n_full:.1f}%)")
jax.tree.map(np.testing.assert_array_equal, base, jax.device_get(chat.params))  # frozen
merged = fmzoo.load("runs/lora")
tokens = jnp.asarray([prompt_ids])
logits_merged = merged.model.apply({"params": merged.params}, tokens)
logits_unmerged = lora_lib.unmerged_apply(chat.model, base, adapters, SPEC, tokens)
moved = float(jnp.abs(logits_merged - chat.model.apply({"params": base}, tokens)).max())
np.testing.assert_allclose(logits_merged, logits_unmerged, atol=1e-4)
print(f"merged == unmerged logits (max |diff| "
      f"{float(jnp.abs(logits_merged - logits_unmerged).max()):.1e}); the adapters moved the "
      f"logits by up to {moved:.3f}; exact match after LoRA {lora_summary['eval_exact_match']:.2f}")
assert n_adapter < 0.2 * n_full and moved > 0

# %% [markdown]
# ## What to take away
#
# - A chat template is just a token layout; the label mask decides what the model learns.
# - SFT took a random model to answering unseen prompts of one task; exact match, not the
#   loss, is what shows it (the loss had a long plateau while exact match stayed at zero).
# - LoRA trains a few percent of the weights, and its merged model is an ordinary model.
#
# Next (notebook 5): teach the model which of two answers is better, with a reward model and
# with DPO.
