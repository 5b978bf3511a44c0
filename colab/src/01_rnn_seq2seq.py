# %% [markdown]
# # 1. The RNN encoder-decoder and its two problems
#
# An RNN encoder reads the source one token at a time and hands the decoder its **final
# hidden state**: everything the decoder learns about the source passes through that one
# vector. Attention (Bahdanau et al., 2015) lets every decoder step look back at all the
# encoder states instead. This notebook measures that difference with fmzoo's RNN models,
# then the two other troubles of recurrence: gradients through many steps fade (or blow
# up), and the steps cannot run in parallel.
#
# Set `SMALL = True` below for a quick run (fewer lengths, seeds and steps; the same checks).

# %% tags=["parameters"]
SMALL = False

# %%
# Sizes, derived from SMALL here rather than in the parameters cell: a runner (papermill,
# CI) sets SMALL in a cell of its own after that one.
LENGTHS = (4, 12) if SMALL else (4, 8, 12, 16)  # source lengths of the accuracy curve
SEEDS = (0,) if SMALL else (0, 1)
STEPS = 300 if SMALL else 600  # training steps per run (batch 32)
TIMING_LENGTHS = (16, 64) if SMALL else (16, 32, 64, 128)

# %%
import os
import shutil
import time

# On a CPU runtime, ask XLA for 8 host devices (notebook 03 does the same to show meshes).
# Here it is a workaround: with a single CPU device, jax 0.10's CPU client stalled for good
# inside this notebook's training loop (cause not found yet); with several it runs. A GPU or
# TPU runtime is left alone. This must happen before jax is imported.
_accelerator = shutil.which("nvidia-smi") or os.environ.get("COLAB_TPU_ADDR") or \
    os.environ.get("TPU_NAME")
_flags = os.environ.get("XLA_FLAGS", "")
if not _accelerator and "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from fmzoo.models import build, get_config, init
from fmzoo.models.rnn import state_gradient_norms
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train.datasets import algorithmic_examples
from fmzoo.train.losses import make_loss
from fmzoo.train.optim import make_optimizer
from fmzoo.train.state import init_params

print("devices:", jax.devices())

# %% [markdown]
# ## The bottleneck, made exact
#
# Cut the encoder's recurrence (zero its hidden-to-hidden matrix): its final state now
# depends on the last source token alone. Two sources that differ everywhere except in that
# last token then look identical to the vanilla decoder, whose only view of the source is
# the final state. The attention decoder reads every encoder state, so it tells them apart.

# %%
vanilla_cfg = get_config("rnn-seq2seq", cell="rnn", d_embed=16, d_hidden=32)
attn_cfg = get_config("rnn-seq2seq-attn", cell="rnn", d_embed=16, d_hidden=32)
pv, pa = init(vanilla_cfg, 0), init(attn_cfg, 0)
cell = pv["encoder"]["cell"]
encoder = {"cell": {**cell, "h": {"kernel": jnp.zeros_like(cell["h"]["kernel"])}}}
pv = {**pv, "encoder": encoder}
pa = {**pa, "encoder": encoder, "src_embed": pv["src_embed"]}  # the same encoder in both

src_a, src_b = jnp.array([[5, 6, 7, 8, 9]]), jnp.array([[60, 61, 62, 63, 9]])  # same last token
tgt = jnp.array([[257, 1, 2, 3]])
moved = {}
for name, cfg, p in [("vanilla", vanilla_cfg, pv), ("attention", attn_cfg, pa)]:
    model = build(cfg)
    la, lb = model.apply({"params": p}, src_a, tgt), model.apply({"params": p}, src_b, tgt)
    moved[name] = float(jnp.abs(la - lb).max())
    print(f"{name:10s} max |logits(a) - logits(b)| = {moved[name]:.2e}")
assert moved["vanilla"] == 0.0 and moved["attention"] > 1e-3, moved

# %% [markdown]
# ## The bottleneck as a curve
#
# Now measured by training. The task is string reversal: a source of exactly L random
# letters, the target is the same letters backwards. For each length and seed we train the
# vanilla GRU encoder-decoder (`rnn-seq2seq`) and the GRU with Bahdanau attention
# (`rnn-seq2seq-attn`) with the same width (64), budget (steps x batch 32), optimiser (fmzoo's
# AdamW with warm-up and cosine decay) and data, then score **held-out** strings never
# seen in training. Token accuracy is teacher-forced (each target letter given the true
# prefix); exact match asks for the whole reversed string, end token included.
#
# Every run of one model is the same program (sources padded to the longest length), so
# `jax.vmap` trains all lengths and seeds of a model at once, each with its own data and
# initialisation, through one compiled training step.

# %%
tok = ByteTokenizer()
S = max(LENGTHS)  # every source padded to S, every target to S + 1 (with its end token)
grid = [(L, seed) for L in LENGTHS for seed in SEEDS]


def reversal_arrays(L, seed, split, pad=S):
    """One split as padded arrays, in the layout fmzoo's seq2seq loss reads: src, tgt_in
    (start token + target), tgt_out (target + end token) and their masks."""
    pairs = algorithmic_examples("reverse", split, min_len=L, max_len=L, num_train=2000,
                                 num_test=256, seed=seed)
    n = len(pairs)
    out = {"src": np.full((n, pad), tok.pad_id), "tgt_in": np.full((n, pad + 1), tok.pad_id),
           "tgt_out": np.full((n, pad + 1), tok.pad_id)}
    for i, (source, target) in enumerate(pairs):
        s_ids, t_ids = tok.encode(source), tok.encode(target)
        out["src"][i, :len(s_ids)] = s_ids
        out["tgt_in"][i, :len(t_ids) + 1] = [tok.bos_id] + t_ids
        out["tgt_out"][i, :len(t_ids) + 1] = t_ids + [tok.eos_id]
    out = {k: v.astype(np.int32) for k, v in out.items()}
    out["src_mask"], out["tgt_mask"] = out["src"] != tok.pad_id, out["tgt_out"] != tok.pad_id
    return out


def stacked(split):  # one leading axis: the runs of the grid
    return jax.tree.map(lambda *xs: np.stack(xs), *[reversal_arrays(L, s, split) for L, s in grid])


train_data, test_data = stacked("train"), stacked("test")


def make_run(preset, steps, batch_size=32, lr=1e-2):
    config = get_config(preset, d_hidden=64, d_embed=32)
    model = build(config)
    loss_fn = make_loss(model, config)
    tx = make_optimizer(lr, steps, warmup_steps=steps // 10)

    @jax.jit
    @jax.vmap
    def start(key):
        params = init_params(config, key)
        return params, tx.init(params)

    @jax.jit
    @jax.vmap
    def step(params, opt, k, train):
        idx_B = jax.random.randint(k, (batch_size,), 0, train["src"].shape[0])
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, jax.tree.map(lambda x: x[idx_B], train))
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    @jax.jit
    @jax.vmap
    def score(params, test):
        mask_BT = test["tgt_mask"].astype(bool)
        logits_BTV = model.apply({"params": params}, test["src"], test["tgt_in"],
                                 test["src_mask"].astype(bool), mask_BT)
        right_BT = (logits_BTV.argmax(-1) == test["tgt_out"]) & mask_BT
        return right_BT.sum() / mask_BT.sum(), (right_BT | ~mask_BT).all(-1).mean()

    def run(keys, train, test):
        # one compiled step for every run of the grid, called once per step from Python
        # (one long compiled loop over all steps is slower to compile and gains nothing here)
        pair = jax.vmap(jax.random.split)(keys)  # [runs, 2]: init, data
        params, opt = start(pair[:, 0])
        step_keys = jax.vmap(lambda k: jax.random.split(k, steps))(pair[:, 1])
        losses = []
        for i in range(steps):
            params, opt, loss = step(params, opt, step_keys[:, i], train)
            losses.append(loss)
        token_acc, exact = score(params, test)
        return jnp.stack(losses, 1), token_acc, exact

    return run


curve = {}
keys = jax.vmap(jax.random.key)(jnp.array([seed for _, seed in grid]))
for label, preset in [("vanilla", "rnn-seq2seq"), ("attention", "rnn-seq2seq-attn")]:
    t0 = time.perf_counter()
    losses, token_acc, exact = jax.device_get(make_run(preset, STEPS)(keys, train_data, test_data))
    curve[label] = {"token": token_acc, "exact": exact, "loss": losses}
    print(f"{label:9s} {len(grid)} runs x {STEPS} steps in {time.perf_counter() - t0:.0f} s")
    for (L, seed), a, e in zip(grid, token_acc, exact):
        print(f"   L={L:2d} seed={seed}  token accuracy {a:.2f}  exact match {e:.2f}")

# %%
def per_length(label, metric):
    vals = np.array(curve[label][metric]).reshape(len(LENGTHS), len(SEEDS))
    return vals.mean(1), vals


fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
for ax, metric in zip(axes, ("token", "exact")):
    for label, color in [("vanilla", "tab:red"), ("attention", "tab:blue")]:
        mean, vals = per_length(label, metric)
        ax.plot(LENGTHS, mean, "o-", color=color, label=label)
        for j in range(len(SEEDS)):
            ax.plot(LENGTHS, vals[:, j], ".", color=color, alpha=0.4)
    ax.set_xlabel("source length L")
    ax.set_title("held-out " + ("token accuracy" if metric == "token" else "exact match"))
    ax.set_ylim(-0.02, 1.02)
axes[0].legend()
fig.tight_layout()
plt.show()

vanilla, attention = per_length("vanilla", "token")[0], per_length("attention", "token")[0]
# the shape of Bahdanau et al.'s Figure 2: the final-state model falls off as sources grow,
# attention stays well above it
assert vanilla[0] > vanilla[-1] + 0.25, vanilla
assert attention[-1] > vanilla[-1] + 0.15, (attention, vanilla)
assert (attention >= vanilla - 0.02).all(), (attention, vanilla)

# %% [markdown]
# The vanilla model's accuracy falls as L grows: one vector of 64 numbers must hold the
# whole source before the first output letter. With attention the decoder looks up the
# letter it needs, so its curve stays well above at every length; longer sources still
# take it more steps to learn, which is why it also slips at the right end within this
# budget. (bench/seq2seq_curve.py runs the same comparison for longer, with the
# encoder-decoder transformer beside them.)
#
# ## Vanishing gradients
#
# Training needs the gradient of the loss with respect to early inputs, and for a
# recurrence that gradient is a product of one Jacobian per step. How much does the last
# state h_T still depend on the input at step t? Below, ||d h_T / d x_t|| against t for a
# tanh RNN, a GRU and an LSTM at initialisation (the gated cells with their keep gate
# open, bias 1, as fmzoo's presets start them).

# %%
T = 60
xs_TE = jax.random.normal(jax.random.key(0), (T, 32))
norms = {c: np.asarray(state_gradient_norms(c, 64, xs_TE, jax.random.key(1)))
         for c in ("rnn", "gru", "lstm")}
plt.figure(figsize=(6, 3.5))
for c, n in norms.items():
    plt.semilogy(np.arange(1, T + 1), n, label=c)
    print(f"{c:5s} ||dh_T/dx_1|| / ||dh_T/dx_T|| = {n[0] / n[-1]:.1e}")
plt.xlabel("input step t")
plt.ylabel("||d h_T / d x_t||")
plt.title(f"how much h_{T} depends on x_t")
plt.legend()
plt.show()
# the tanh RNN forgets the start of a 60-step sequence by many orders of magnitude;
# the gated cells keep orders of magnitude more of it
assert norms["rnn"][0] / norms["rnn"][-1] < 1e-6, norms["rnn"][[0, -1]]
for c in ("gru", "lstm"):
    assert norms[c][0] / norms[c][-1] > 1e3 * norms["rnn"][0] / norms["rnn"][-1], c

# %% [markdown]
# ## Exploding gradients, and clipping
#
# The same product of Jacobians can also grow: when the recurrent matrix stretches the
# state more than tanh squashes it, a small change early on is amplified at every step.
# Below, a tanh encoder-decoder whose recurrent matrices start twice as large as usual is
# trained with plain SGD at a learning rate of 10, twice with the same data and seed: once
# as is, once with the gradient clipped to global norm 0.3 (`optax.clip_by_global_norm`,
# the first link of fmzoo's optimiser chain), so no step moves the weights further than
# 10 x 0.3 (Pascanu et al., 2013). Both runs are in one `vmap`: the threshold is an input
# of the program (infinity: no clipping). The dashed line is the loss of a uniform guess
# over the vocabulary, ln V: a run above it has learned less than nothing.

# %%
L_EXP, STEPS_EXP, LR_EXP, CLIP_EXP = 12, (150 if SMALL else 300), 10.0, 0.3
exp_cfg = get_config("rnn-seq2seq", cell="rnn", d_hidden=64, d_embed=32)
exp_loss = make_loss(build(exp_cfg), exp_cfg)
exp_data = {k: jnp.asarray(v) for k, v in reversal_arrays(L_EXP, 0, "train", pad=L_EXP).items()}


def scaled_recurrence(params, gain):
    def scale(path, x):
        name = jax.tree_util.keystr(path)
        return x * gain if "['h']['kernel']" in name else x
    return jax.tree_util.tree_map_with_path(scale, params)


@jax.jit
@jax.vmap
def sgd_run(clip):
    params = scaled_recurrence(init_params(exp_cfg, jax.random.key(0)), 2.0)
    tx = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(LR_EXP))

    def step(carry, k):
        params, opt = carry
        idx_B = jax.random.randint(k, (32,), 0, exp_data["src"].shape[0])
        (loss, _), grads = jax.value_and_grad(exp_loss, has_aux=True)(
            params, jax.tree.map(lambda x: x[idx_B], exp_data))
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), (loss, optax.global_norm(grads),
                                                            optax.global_norm(updates))

    _, trace = jax.lax.scan(step, (params, tx.init(params)),
                            jax.random.split(jax.random.key(1), STEPS_EXP))
    return trace


loss_exp, gnorm_exp, unorm_exp = jax.device_get(sgd_run(jnp.array([jnp.inf, CLIP_EXP])))
uniform = np.log(exp_cfg.vocab_size)
fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
axes[1].axhline(uniform, color="gray", ls="--", lw=1, label="uniform guess (ln V)")
for i, label in enumerate(("no clipping", f"clipped at {CLIP_EXP}")):
    axes[0].semilogy(gnorm_exp[i], label=label, lw=1)
    axes[1].plot(loss_exp[i], label=label, lw=1)
    print(f"{label:13s} largest gradient norm {gnorm_exp[i].max():8.1f} (median "
          f"{np.median(gnorm_exp[i]):.2f}), largest step {unorm_exp[i].max():6.1f}, "
          f"final loss {loss_exp[i][-20:].mean():.2f}")
axes[0].set_title("gradient norm")
axes[1].set_title("training loss")
for ax in axes:
    ax.set_xlabel("step")
axes[1].legend()
fig.tight_layout()
plt.show()
# clipping bounds every step (lr x threshold); without it gradient spikes throw the weights
# far and the run ends worse than a uniform guess, while the clipped one learns
final_exp = loss_exp[:, -20:].mean(1)
assert unorm_exp[1].max() <= LR_EXP * CLIP_EXP * (1 + 1e-4), unorm_exp[1].max()
assert unorm_exp[0].max() > 5 * unorm_exp[1].max(), unorm_exp.max(1)
assert final_exp[0] > uniform and final_exp[1] < uniform - 1.5, (final_exp, uniform)

# %% [markdown]
# ## Sequential by construction
#
# The RNN must finish step t before it starts step t+1: a source of S tokens is S dependent
# steps, whatever the hardware. A transformer layer handles all S positions in one parallel
# pass, so its chain of dependent steps is its number of layers. To compare fairly, both
# models below have the same width (64) and see the same batch (16 rows); we time one
# forward pass (encode the source, decode a target as long), compile time excluded,
# median of a few runs. On a CPU both are bound by arithmetic; on a GPU or TPU the RNN's
# S small steps leave the accelerator idle while the transformer's pass fills it.

# %%
def forward_ms(cfg, length, reps=5):
    model, params = build(cfg), init(cfg, 0)
    tokens = jnp.ones((16, length), jnp.int32)
    f = jax.jit(lambda p, s: model.apply({"params": p}, s, s))
    f(params, tokens).block_until_ready()  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(params, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


rnn_cfg = get_config("rnn-seq2seq-attn", d_hidden=64, d_embed=64)
tf_cfg = get_config("transformer-seq2seq", d_model=64, n_heads=4, d_ff=256)
timing = {"GRU + attention": [], "transformer": []}
for length in TIMING_LENGTHS:
    timing["GRU + attention"].append(forward_ms(rnn_cfg, length))
    timing["transformer"].append(forward_ms(tf_cfg, length))
    print(f"S={length:4d}  GRU+attention: {2 * length} dependent steps, "
          f"{timing['GRU + attention'][-1]:7.2f} ms   transformer: "
          f"{tf_cfg.n_encoder_layers + tf_cfg.n_decoder_layers} layers, "
          f"{timing['transformer'][-1]:7.2f} ms")

plt.figure(figsize=(6, 3.5))
for label, ms in timing.items():
    plt.loglog(TIMING_LENGTHS, ms, "o-", label=label)
plt.xlabel("sequence length S (source = target)")
plt.ylabel("forward ms (batch 16)")
plt.title(f"one forward pass on {jax.devices()[0].platform.upper()}")
plt.legend()
plt.show()
# the RNN's time grows with the number of its sequential steps
rnn_ms = timing["GRU + attention"]
assert rnn_ms[-1] > 0.3 * (TIMING_LENGTHS[-1] / TIMING_LENGTHS[0]) * rnn_ms[0], rnn_ms

# %% [markdown]
# On this CPU both curves grow with S, since either way every position costs arithmetic.
# Run the notebook on a GPU runtime and the picture changes: the transformer's time stays
# nearly flat over these lengths (one parallel pass per layer fills the device), while the
# RNN's still grows step by step. That, and the bottleneck above, is what attention without
# recurrence fixes.
