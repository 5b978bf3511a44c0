# %% [markdown]
# # 2. Attention, the transformer, and inference in two steps
#
# Attention(Q, K, V) = softmax(QK^T / sqrt(d_k)) V. Each query is compared with every key
# by a dot product; the softmax turns those scores into weights that sum to one; the output
# is the weighted mix of the values. A query is what the current position is looking for, a
# key is how a position can be found, a value is what it hands over once found. This
# notebook checks fmzoo's attention against JAX's fast path, builds the masks and the heads,
# loads a decoder-only transformer, and splits its inference into prefill and decode.
#
# Set `SMALL = True` below for a quick run (fewer prompt lengths and tokens).

# %% tags=["parameters"]
SMALL = False

# %%
# Sizes, derived from SMALL here rather than in the parameters cell: a runner (papermill,
# CI) sets SMALL in a cell of its own after that one.
PROMPT_LENGTHS = (16, 224) if SMALL else (16, 32, 64, 128, 224)
DECODE_TOKENS = 8 if SMALL else 24  # tokens timed per decode measurement
REPS = 2 if SMALL else 5  # timing repetitions (median)

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import fmzoo
from fmzoo.infer import generate
from fmzoo.models import count_params, get_config
from fmzoo.models import attention as A

print("devices:", jax.devices())

# %% [markdown]
# ## The formula and the fast path
#
# `A.scaled_dot_product_attention` is the formula written out (scores, mask, softmax in
# fp32, weighted sum). `A.dot_product_attention` sends the same call to
# `jax.nn.dot_product_attention`, which XLA (or cuDNN on a GPU) runs as one fused kernel.
# Shapes: B batch, T queries, S keys, H heads, D the width of one head.

# %%
B, T, H, D = 2, 6, 4, 8
q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, D)) for i in range(3))
causal = A.causal_mask(T)
ref = A.scaled_dot_product_attention(q, k, v, causal)
fast = A.dot_product_attention(q, k, v, causal, impl="xla")
by_hand = jax.nn.softmax(jnp.where(causal, jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D),
                                   -jnp.inf), axis=-1)
by_hand = jnp.einsum("bhts,bshd->bthd", by_hand, v)
print("max |reference - jax.nn.dot_product_attention| =", float(jnp.abs(ref - fast).max()))
print("max |reference - einsum by hand|               =", float(jnp.abs(ref - by_hand).max()))
assert jnp.allclose(ref, fast, atol=1e-5) and jnp.allclose(ref, by_hand, atol=1e-5)

# %% [markdown]
# ## Masks
#
# A mask says which keys a query may see (True: allowed). The **causal** mask lets position
# t see positions <= t only, so a language model cannot peek at the token it must predict.
# The **padding** mask hides the filler at the end of shorter rows of a batch. Both are
# checked by what they promise: changing what a mask hides changes nothing.

# %%
k2, v2 = k.at[:, 4:].set(99.0), v.at[:, 4:].set(-99.0)  # change positions 4 and 5 only
out2 = A.scaled_dot_product_attention(q, k2, v2, causal)
print("causal: outputs at t < 4 moved by", float(jnp.abs(out2[:, :4] - ref[:, :4]).max()),
      "| at t >= 4 by", float(jnp.abs(out2[:, 4:] - ref[:, 4:]).max()))
assert jnp.allclose(out2[:, :4], ref[:, :4]) and not jnp.allclose(out2[:, 4:], ref[:, 4:])

lengths = jnp.array([6, 3])  # row 1 has 3 real tokens and 3 of padding
pad = A.padding_mask(A.lengths_to_mask(lengths, T))
both = A.combine_masks(causal, pad)
out_pad = A.scaled_dot_product_attention(q, k2, v2, both)
out_ref = A.scaled_dot_product_attention(q, k.at[1, 3:].set(-7.0), v.at[1, 3:].set(7.0), both)
assert jnp.allclose(out_pad[1, :3], out_ref[1, :3]), "row 1's real queries ignore its padding"
print("padding: the real positions of row 1 do not see its padded keys")

# %% [markdown]
# ## Multi-head attention
#
# With H heads, the model's width E is cut into H slices of D = E / H; each head runs the
# formula on its own slice, with its own projections, so each can look for something
# different, and the results are concatenated. Below: running the heads one at a time and
# concatenating equals the batched call.

# %%
E = H * D
x_BTE = jax.random.normal(jax.random.key(7), (B, T, E))
Wq, Wk, Wv = (jax.random.normal(jax.random.key(10 + i), (E, E)) / np.sqrt(E) for i in range(3))
split = lambda y: y.reshape(B, T, H, D)  # noqa: E731  [B, T, E] -> [B, T, H, D]
q_h, k_h, v_h = split(x_BTE @ Wq), split(x_BTE @ Wk), split(x_BTE @ Wv)
batched = A.dot_product_attention(q_h, k_h, v_h, causal, impl="xla").reshape(B, T, E)
one_at_a_time = jnp.concatenate(
    [A.scaled_dot_product_attention(q_h[:, :, h:h + 1], k_h[:, :, h:h + 1], v_h[:, :, h:h + 1],
                                    causal)[:, :, 0] for h in range(H)], axis=-1)
assert jnp.allclose(batched, one_at_a_time, atol=1e-5)
print("heads one at a time, concatenated == all heads at once")

# %% [markdown]
# ## Attention maps
#
# The weights softmax(QK^T / sqrt(d_k)) are a map: row t says where query t looks. Here the
# "sentence" is a few words with one random vector each, and each query is its own word's
# vector: every word looks hardest at itself and at the other copies of itself. Then the
# causal mask removes the future, and the padding mask removes the filler.

# %%
words = "the cat sat on the mat <pad> <pad>".split()
vocab = sorted(set(words))
vec = jax.random.normal(jax.random.key(3), (len(vocab), 16)) * 1.5
x_SD = vec[jnp.array([vocab.index(w) for w in words])]
n = len(words)
scores = x_SD @ x_SD.T / np.sqrt(16)
real = jnp.array([w != "<pad>" for w in words])
maps = {"no mask": jnp.ones((n, n), bool), "causal": A.causal_mask(n)[0, 0],
        "causal + padding": A.causal_mask(n)[0, 0] & real[None, :]}
fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
weights = {}
for ax, (title, m) in zip(axes, maps.items()):
    weights[title] = np.asarray(jax.nn.softmax(jnp.where(m, scores, -jnp.inf), axis=-1))
    ax.imshow(weights[title], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(n), words, rotation=90, fontsize=7)
    ax.set_yticks(range(n), words, fontsize=7)
fig.tight_layout()
plt.show()
w = weights["no mask"]
assert w[4, 0] > 0.3 and w[0, 4] > 0.3, "the two 'the's find each other"
assert np.allclose(np.triu(weights["causal"], 1), 0)  # nothing above the diagonal
assert np.allclose(weights["causal + padding"][:, 6:], 0)  # no weight on padding

# %% [markdown]
# ## The transformer
#
# fmzoo's zoo holds the encoder-decoder of Vaswani et al. (2017) (`transformer-base`: 6 + 6
# layers, width 512, 8 heads) and decoder-only language models (`gpt-tiny`, `llama-tiny`,
# the GPT-2 and Llama shapes). `fmzoo.load` returns model, params, config and tokenizer;
# a preset name gives a random initialisation and the byte tokenizer.

# %%
for name in ("transformer-base", "gpt-tiny", "llama-tiny"):
    cfg = get_config(name)
    print(f"{name:17s} {count_params(cfg) / 1e6:7.2f} M params")
print(f"transformer-base: {get_config('transformer-base').n_encoder_layers} encoder + "
      f"{get_config('transformer-base').n_decoder_layers} decoder layers")
lm = fmzoo.load("gpt-tiny")
cfg = lm.config
print(f"gpt-tiny: {cfg.n_layers} layers, width {cfg.d_model}, {cfg.n_heads} heads, "
      f"context {cfg.max_len}")

# %% [markdown]
# ## Prefill and decode
#
# Generation has two phases. **Prefill** runs the whole prompt through the model in one
# parallel pass, writes every position's keys and values into the KV cache, and gives the
# logits of the first new token. **Decode** then feeds one token at a time; each step
# computes keys and values for the new token only and attends over the cache instead of
# recomputing the prefix. The logits must equal those of a full forward pass over the
# whole sequence, recomputed from scratch:

# %%
prompt = lm.tokenizer.encode("def add(a, b):", add_bos=True)
N_NEW, MAX = 12, 256
cache = lm.model.init_cache(1, MAX)
logits, cache = lm.model.apply({"params": lm.params}, jnp.asarray([prompt]),
                               jnp.ones((1, len(prompt)), bool), cache, method="prefill")
tokens, cached_logits = list(prompt), []
for _ in range(N_NEW):
    cached_logits.append(logits[0])
    tokens.append(int(logits[0].argmax()))
    logits, cache = lm.model.apply({"params": lm.params}, jnp.asarray([tokens[-1]]), cache,
                                   method="decode_step")
full = lm.model.apply({"params": lm.params}, jnp.asarray([tokens]))[0]  # no cache
recomputed = full[len(prompt) - 1:len(tokens) - 1]
err = float(jnp.abs(jnp.stack(cached_logits) - recomputed).max())
print(f"max |cached - recomputed logits| over {N_NEW} steps = {err:.2e}")
assert err < 1e-3, err
out = generate(lm.model, lm.params, [prompt], max_new_tokens=N_NEW)
assert out[0] == tokens[len(prompt):], "generate's compiled loop takes the same path"

# %% [markdown]
# ## Time to first token vs time per token
#
# Prefill reads the whole prompt, so the time to the first token grows with the prompt,
# though much less than in proportion: the prompt's tokens go through in one parallel pass,
# so each one costs less the longer the prompt is. A decode step handles one token and reads a cache of fixed size, so its time hardly
# depends on how long the prompt was. Each shape is compiled and run once before timing
# (compile time excluded); the times are medians.

# %%
params = lm.params
prefill = jax.jit(lambda p, t, m, c: lm.model.apply({"params": p}, t, m, c, method="prefill"))
step = jax.jit(lambda p, t, c: lm.model.apply({"params": p}, t, c, method="decode_step"))


def decode_n(cache, token, n):
    for _ in range(n):
        logits, cache = step(params, token, cache)
        token = logits.argmax(-1)
    return jax.block_until_ready(token)


ttft, per_token = [], []
for P in PROMPT_LENGTHS:
    toks = jnp.full((1, P), 65, jnp.int32)
    mask = jnp.ones((1, P), bool)
    empty = lm.model.init_cache(1, MAX)
    jax.block_until_ready(prefill(params, toks, mask, empty))  # compile this prompt length
    logits, filled = prefill(params, toks, mask, empty)
    first = logits.argmax(-1)
    decode_n(filled, first, 2)  # compile the decode step
    t_pre, t_dec = [], []
    for _ in range(REPS):
        t0 = time.perf_counter()
        jax.block_until_ready(prefill(params, toks, mask, empty))
        t_pre.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode_n(filled, first, DECODE_TOKENS)
        t_dec.append((time.perf_counter() - t0) / DECODE_TOKENS)
    ttft.append(1e3 * np.median(t_pre))
    per_token.append(1e3 * np.median(t_dec))
    print(f"prompt {P:4d} tokens: time to first token {ttft[-1]:7.2f} ms, "
          f"per decoded token {per_token[-1]:6.2f} ms")

plt.figure(figsize=(6, 3.5))
plt.plot(PROMPT_LENGTHS, ttft, "o-", label="prefill: time to first token")
plt.plot(PROMPT_LENGTHS, per_token, "s-", label="decode: time per token")
plt.xlabel("prompt length (tokens)")
plt.ylabel("ms")
plt.title(f"gpt-tiny on {jax.devices()[0].platform.upper()}, batch 1")
plt.legend()
plt.show()
# prefill's cost follows the prompt, less than in proportion (one parallel pass); a decode
# step's cost does not follow it
assert ttft[-1] > 1.3 * ttft[0], ttft
assert ttft[-1] / PROMPT_LENGTHS[-1] < 0.5 * ttft[0] / PROMPT_LENGTHS[0], ttft
assert per_token[-1] < 2 * per_token[0], per_token
assert ttft[-1] / ttft[0] > 1.5 * per_token[-1] / per_token[0], (ttft, per_token)

# %% [markdown]
# Prefill is one big parallel pass: its cost is set by arithmetic (compute-bound on an
# accelerator). Decode is many small passes, each reading every weight and the cache to
# produce one token: its cost is set by memory traffic, and the first token's wait is paid
# once while every later token pays the decode time. That is why serving systems report
# the two numbers separately.
