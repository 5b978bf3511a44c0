# %% [markdown]
# # 7. Hugging Face checkpoints: load, chat, finetune, export
#
# Most open models are published as Hugging Face checkpoint directories: a `config.json`
# that names the architecture and its sizes, the weights in `model.safetensors` (sometimes
# split over several files with an index), the tokenizer (`tokenizer.json`, and in
# `tokenizer_config.json` the special tokens and the jinja2 **chat template**), and the
# decoding defaults in `generation_config.json`. fmzoo reads such a directory for the GPT-2
# and Llama families (`GPT2LMHeadModel`, `LlamaForCausalLM`) into its own Flax modules, and
# writes one back.
#
# This notebook stays offline: it makes a tiny *random* Llama with transformers and torch,
# saves it as a real checkpoint directory, then walks the round trip: load it in fmzoo and
# check the numbers against transformers, chat with it, finetune it with LoRA, export the
# result and load the export in transformers again.
#
# With a real checkpoint nothing changes but the path. For example, after
# `huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir Llama-3.2-1B-Instruct`
# (the licence must be accepted on the Hub first), `fmzoo.load("Llama-3.2-1B-Instruct")`,
# `fmzoo chat --model Llama-3.2-1B-Instruct` and
# `fmzoo sft --model Llama-3.2-1B-Instruct --lora-rank 8 ...` work exactly as below; a GPU
# runtime and `dtype="bfloat16"` make a 1B model comfortable.

# %% tags=["parameters"]
SMALL = False

# %%
# Sizes, derived from SMALL here rather than in the parameters cell: a runner (papermill,
# CI) sets SMALL in a cell of its own after that one.
SFT_STEPS = 60 if SMALL else 120
HIDDEN = 64 if SMALL else 128
LAYERS = 2

# %% [markdown]
# transformers and torch are only needed to *make* the checkpoint and to check fmzoo against
# them; fmzoo reads and writes the files without them. Colab has both installed.

# %%
import os
import warnings

# progress bars (of the dataset build, of checkpoint loading) would fill the page; tqdm
# reads this when it is first imported
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm outside Colab
try:
    import torch
    import transformers
except ImportError as e:
    raise ImportError(
        f"this notebook needs transformers and torch to build its checkpoint ({e}); install "
        "them with `pip install transformers torch`, then run the notebook again") from None

import json

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

# GPUs and TPUs multiply float32 matrices in fewer-bit passes (TF32, bf16) by default;
# comparing with transformers on the CPU to 1e-4 needs full float32.
jax.config.update("jax_default_matmul_precision", "highest")
print("transformers", transformers.__version__, "| torch", torch.__version__,
      "| jax", jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## A tiny checkpoint directory
#
# First the tokenizer: a byte-level BPE (as Llama 3 and GPT-2 use) trained on a few
# sentences, with Llama 3's special tokens and its chat template, which wraps each turn in
# `<|start_header_id|>role<|end_header_id|>` ... `<|eot_id|>`. Then a `LlamaForCausalLM`
# with grouped-query attention (4 query heads share 2 key/value heads), random weights.

# %%
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FACTS = [("What colour is the sky?", "Blue."), ("What do bees make?", "Honey."),
         ("Where do fish live?", "In water."), ("What is two plus two?", "Four."),
         ("What do cows drink?", "Water."), ("Which season is the coldest?", "Winter."),
         ("What is the opposite of up?", "Down."), ("How many legs does a cat have?", "Four."),
         ("What shines at night?", "The moon."), ("What falls from clouds?", "Rain.")]
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]

bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
corpus = [q + " " + a for q, a in FACTS] + ["system user assistant", "You are a helpful bot."]
bpe.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=384, special_tokens=SPECIAL, show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # every byte stays encodable
hf_tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>",
                                 eos_token="<|end_of_text|>",
                                 pad_token="<|end_of_text|>")  # Llama 3 pads with its EOS
hf_tok.chat_template = LLAMA3_TEMPLATE

bos, eos, eot = (hf_tok.convert_tokens_to_ids(t)
                 for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
hf_config = LlamaConfig(
    vocab_size=len(hf_tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
    num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
    initializer_range=0.1, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
torch.manual_seed(0)
hf_model = LlamaForCausalLM(hf_config).eval()
hf_model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=[eos, eot],
                                              do_sample=False)

CKPT = "tiny-llama"
hf_model.save_pretrained(CKPT, safe_serialization=True)
hf_tok.save_pretrained(CKPT)
print(sorted(os.listdir(CKPT)))
print(f"{sum(p.numel() for p in hf_model.parameters()):,} parameters, vocabulary {len(hf_tok)}")

# %% [markdown]
# ## Load it in fmzoo, and check the numbers
#
# `fmzoo.load(directory)` maps every tensor to fmzoo's parameter tree (transposing torch's
# `[out, in]` linear weights, splitting heads) and reads the tokenizer, its special ids and
# chat template, and the generation defaults. The test of a converter is that the two
# implementations compute the same function: the same logits on a padded batch, and the same
# greedy continuation.

# %%
import fmzoo
from fmzoo.infer import generate

lm = fmzoo.load(CKPT)
print(type(lm.model).__name__, lm.config.flavor, f"{lm.config.n_layers} layers, d_model "
      f"{lm.config.d_model}, {lm.config.n_heads} heads / {lm.config.n_kv_heads} kv heads")
print("eos ids from generation_config.json:", lm.generation.eos_ids)

texts = ["What do bees make? Honey.", "Where do fish live?", "Blue"]
enc = hf_tok(texts, padding=True, return_tensors="np")  # right padding, with a mask
tokens, mask = enc["input_ids"], enc["attention_mask"].astype(bool)
with torch.no_grad():
    want = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(enc["attention_mask"])
                    ).logits.numpy()
got = np.asarray(lm.model.apply({"params": lm.params}, jnp.asarray(tokens),
                                padding_mask_BT=jnp.asarray(mask)))
gap = np.abs(got[mask] - want[mask]).max()
print(f"largest logit difference over {mask.sum()} real tokens: {gap:.2e} "
      f"(logits range up to {np.abs(want[mask]).max():.2f})")
assert np.abs(want[mask]).max() > 0.5  # not a comparison of near-zero numbers
assert gap < 1e-4, gap

# %%
prompt = hf_tok("Where do fish live?")["input_ids"]
ours = generate(lm.model, lm.params, [prompt], max_new_tokens=20, eos_id=None)[0]
with torch.no_grad():
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, eos_token_id=None, pad_token_id=eos)
theirs = theirs[0, len(prompt):].tolist()
print("fmzoo:       ", ours)
print("transformers:", theirs)
assert list(ours) == theirs

# %% [markdown]
# ## A chat turn
#
# A chat model sees the conversation through its chat template. fmzoo renders the
# checkpoint's jinja2 template the way transformers does (the token ids must be identical,
# or the model sees text it was never trained on), generates until an end-of-turn token
# (`<|eot_id|>` here) and decodes the reply. The weights are random, so the reply is noise.

# %%
from fmzoo.models.chat import apply_chat_template, end_of_turn_ids

messages = [{"role": "user", "content": "What do bees make?"}]
ids = apply_chat_template(lm.tokenizer, messages, add_generation_prompt=True)
reference = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
reference = list(reference["input_ids"] if hasattr(reference, "keys") else reference)
assert ids == reference, (ids, reference)
print(repr(apply_chat_template(lm.tokenizer, messages, add_generation_prompt=True,
                               tokenize=False)))
stops = end_of_turn_ids(lm.tokenizer)
assert eot in stops
reply = generate(lm.model, lm.params, [ids], max_new_tokens=12, eos_id=stops)[0]
print("reply of the random model:", repr(lm.tokenizer.decode(reply)))

# %% [markdown]
# ## Finetune it
#
# Supervised finetuning on a small JSONL file of conversations in TRL's `messages` format.
# The prompt's tokens carry no labels: only the assistant's answer and its `<|eot_id|>` do,
# so the model learns to answer and to stop. With `lora_rank` the checkpoint's weights stay
# frozen and only low-rank adapters on the attention and MLP kernels train; the workdir then
# loads with the adapters merged into the weights. (With a random model and ten facts, all
# it can do is memorise them; the last record is held out as the validation split.)

# %%
from fmzoo.train.metrics import read_metrics
from fmzoo.train.sft import SFTSettings, sft

with open("facts.jsonl", "w") as f:
    for q, a in FACTS:
        f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]}) + "\n")

summary = sft(SFTSettings.from_dict({
    "model": {"source": CKPT},
    "data": {"name": "facts.jsonl", "batch_size": 8, "max_length": 32},
    "sft": {"lora_rank": 8, "lora_alpha": 16.0},
    "optim": {"lr": 1e-2, "warmup": 5},
    "eval": {"every": 0, "examples": 0, "at_start": False},
    "run": {"workdir": "runs/sft", "steps": SFT_STEPS, "log_every": 1, "progress": False},
}))
rows = [r for r in read_metrics("runs/sft") if "loss" in r]
steps, sft_losses = [r["step"] for r in rows], [r["loss"] for r in rows]
print(f"SFT loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} in {SFT_STEPS} steps; "
      f"token accuracy {rows[-1]['mean_token_accuracy']:.2f}")
assert sft_losses[-1] < 0.3 * sft_losses[0], (sft_losses[0], sft_losses[-1])

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(steps, sft_losses)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("SFT loss (answer tokens)")
ax.set_title("LoRA finetuning of the tiny Llama")
plt.tight_layout()
plt.show()

# %% [markdown]
# The finetuned workdir answers in the chat the way it was taught (the held-out fact it
# never saw keeps a high loss: the evaluation line above). `fmzoo chat` is the same
# thing on the command line; here one turn of it through `fmzoo.cli.main`.

# %%
tuned = fmzoo.load("runs/sft")
question, answer = FACTS[1]
ids = apply_chat_template(tuned.tokenizer, [{"role": "user", "content": question}],
                          add_generation_prompt=True)
out = generate(tuned.model, tuned.params, [ids], max_new_tokens=12,
               eos_id=end_of_turn_ids(tuned.tokenizer))[0]
print(question, "->", repr(tuned.tokenizer.decode(out)))
assert tuned.tokenizer.decode(out).strip() == answer

from fmzoo.cli import main

status = main(["chat", "--model", "runs/sft", "--prompt", FACTS[0][0],
               "--max-new-tokens", "12"])
assert status == 0

# %% [markdown]
# ## Export, and load the export in transformers
#
# `fmzoo export` writes a workdir (or any model fmzoo loads) as a Hugging Face directory:
# config.json, model.safetensors, generation_config.json and the tokenizer with its chat
# template. transformers' `AutoModelForCausalLM` and `AutoTokenizer` read it like any other
# checkpoint, and compute what fmzoo computes.

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

assert main(["export", "--model", "runs/sft", "--out", "exported"]) == 0
print(sorted(os.listdir("exported")))
back = AutoModelForCausalLM.from_pretrained("exported").eval()
back_tok = AutoTokenizer.from_pretrained("exported")

chat_ids = back_tok.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True)
chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
assert chat_ids == ids  # the same template and tokenizer came back
with torch.no_grad():
    want = back(torch.tensor([ids])).logits.numpy()
got = np.asarray(tuned.model.apply({"params": tuned.params}, jnp.asarray([ids])))
print(f"exported model: largest logit difference {np.abs(got - want).max():.2e}")
np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
with torch.no_grad():  # stopping at the end of the turn, as fmzoo's chat does
    hf_out = back.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                           eos_token_id=end_of_turn_ids(tuned.tokenizer))
hf_reply = back_tok.decode(hf_out[0, len(ids):], skip_special_tokens=True)
print("transformers answers", repr(hf_reply))
assert hf_reply.strip() == answer
