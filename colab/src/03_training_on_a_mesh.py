# %% [markdown]
# # 3. Training on a device mesh
#
# A model that no longer fits one accelerator, or a batch that would take too long on one,
# is spread over many devices. JAX describes the devices as a **mesh**: an array of devices
# whose axes have names. fmzoo's meshes always have the same three axes:
#
# - `data`: each device holds a full copy of the parameters and a slice of the batch;
# - `fsdp`: the batch is sliced as for `data`, and the parameters and optimizer state are
#   sliced too (fully sharded data parallel); each weight is gathered whole just before use;
# - `tensor`: single matrices are split over devices (model parallel), so each device
#   computes a slice of every layer.
#
# Each parameter carries *logical* axis names (`embed`, `vocab`, `mlp`, `heads`, ...) and one
# table of rules maps them onto the mesh axes. This notebook lays a tiny GPT out on several
# meshes, checks that every layout (and the classic `jax.pmap`) trains exactly like one
# device, measures what FSDP saves per device, then trains with checkpoints, interrupts the
# run and resumes it to the same numbers.

# %% tags=["parameters"]
SMALL = False

# %%
# Sizes, derived from SMALL here rather than in the parameters cell: a runner (papermill,
# CI) sets SMALL in a cell of its own after that one.
STEPS = 4 if SMALL else 12            # steps of the layout comparison
RUN_STEPS = 8 if SMALL else 60        # steps of the checkpointed run
D_MODEL = 32 if SMALL else 64
N_LAYERS = 1 if SMALL else 2

# %% [markdown]
# ## Devices
#
# On a GPU or TPU runtime the notebook uses the devices that are there. A CPU runtime has
# one device, and a mesh of one device shows nothing, so before JAX is imported we ask XLA's
# host platform to present the CPU as 8 devices (`--xla_force_host_platform_device_count=8`).
# They share the same cores, so nothing gets faster, but the sharding, the collectives and
# the numbers are exactly those of 8 real devices. The flag only takes effect when it is set
# before the first `import jax` of the kernel.

# %%
import glob
import os
import sys
import warnings


def accelerator_expected() -> bool:
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    gpu = bool(glob.glob("/dev/nvidia[0-9]*"))
    tpu = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
               or os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"))
    return gpu or tpu


# progress bars (of the dataset build, of checkpoint loading) would fill the page; tqdm
# reads this when it is first imported
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm outside Colab
flags = os.environ.get("XLA_FLAGS", "")
if not accelerator_expected() and "xla_force_host_platform_device_count" not in flags:
    if "jax" in sys.modules:
        print("jax is already imported: restart the kernel to get 8 simulated CPU devices")
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

# GPUs and TPUs multiply float32 matrices in fewer-bit passes (TF32, bf16) by default; full
# float32 keeps the comparisons below about the layouts, not about the matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")
# Each run below compiles its own step; the training runs at the end compile the same
# programs again, which this on-disk cache of compiled XLA programs turns into a lookup.
jax.config.update("jax_compilation_cache_dir", os.path.abspath("jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

N = jax.device_count()
print(f"{N} devices of kind {jax.devices()[0].device_kind!r} ({jax.default_backend()})")

# %% [markdown]
# ## A mesh with named axes
#
# `make_mesh` takes the sizes of the three axes; they must multiply to the number of devices.
# With 8 devices we use 2 x 2 x 2, so that every kind of parallelism is present at once
# (on fewer devices the layout shrinks to what divides them).

# %%
from fmzoo.models import get_config, logical_axes, param_shapes
from fmzoo.models.sharding import LOGICAL_AXIS_RULES, param_shardings
from fmzoo.train import make_mesh


def mixed_spec(n: int) -> str:
    if n % 4 == 0:
        return f"data={n // 4},fsdp=2,tensor=2"
    if n % 2 == 0:
        return f"data={n // 2},fsdp=2"
    return f"data={n}"


mesh = make_mesh(mixed_spec(N))
print("mesh axes:", dict(mesh.shape))
print("device ids laid out on the mesh:\n", np.vectorize(lambda d: d.id)(mesh.devices))

config = get_config("gpt-tiny", n_layers=N_LAYERS, d_model=D_MODEL, n_heads=4,
                    d_ff=4 * D_MODEL, max_len=64)
print("rules (logical axis -> mesh axes):", LOGICAL_AXIS_RULES)

# %% [markdown]
# Every parameter's logical axes turn into a `PartitionSpec` over the mesh axes. An axis
# that the mesh does not divide (say 4 heads over 8 devices) stays whole rather than failing.

# %%
axes, shapes = logical_axes(config), param_shapes(config)
shardings = param_shardings(axes, shapes, mesh)


def show(path):
    a, s, sh = axes, shapes, shardings
    for k in path:
        a, s, sh = a[k], s[k], sh[k]
    shape = tuple(getattr(s, "shape", s))
    print(f"{'/'.join(path):28s} shape {str(shape):14s} logical {str(tuple(a)):26s} "
          f"-> {str(sh.spec):28s} per device {sh.shard_shape(shape)}")


for path in [("embed", "embedding"), ("layers_0", "attn", "query", "kernel"),
             ("layers_0", "mlp", "up", "kernel"), ("layers_0", "mlp", "down", "kernel"),
             ("layers_0", "attn_norm", "scale")]:
    show(path)

# %% [markdown]
# The same layout drawn: which device holds which block of the embedding table
# (vocabulary rows split over `tensor`, embedding columns over `fsdp`, and a copy on each
# `data` replica). `jax.debug.visualize_array_sharding` draws it when `rich` is installed
# (it is in Colab); otherwise we print each device's slice.

# %%
emb = jax.device_put(jnp.zeros(shapes["embed"]["embedding"].shape),
                     shardings["embed"]["embedding"])
try:
    import rich  # noqa: F401
    jax.debug.visualize_array_sharding(emb)
except ImportError:
    for shard in emb.addressable_shards[:8]:
        rows, cols = shard.index
        print(f"device {shard.device.id}: rows {rows.start or 0}:{rows.stop or emb.shape[0]}, "
              f"cols {cols.start or 0}:{cols.stop or emb.shape[1]}")

# %% [markdown]
# ## The same training on every layout
#
# A batch of byte-level text (the Zen of Python) and a few AdamW steps, once on a single
# device and then on meshes that are all `data`, all `fsdp`, all `tensor`, the 2 x 2 x 2 mix,
# and with `jax.pmap` (one replica per device, gradients summed with `psum`). (The small
# mode that CI runs keeps only the mix, which has all three kinds at once.) The loss is a
# token-weighted mean, so however the batch is split, the step computes the same number; only
# the order of floating-point sums differs.

# %%
import codecs
import contextlib
import io

with contextlib.redirect_stdout(io.StringIO()):  # the first import prints the Zen
    import this

from fmzoo.models.registry import build
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import (make_loss, make_optimizer, make_pmap_step, make_train_step, put_batch,
                         replicate, shard_batch, sharded_init)
from fmzoo.train.state import state_shapes, state_shardings

zen = codecs.decode(this.s, "rot13")
ids = np.asarray(ByteTokenizer().encode(zen * 4))
B = N * max(1, 16 // N)  # rows: a multiple of the device count
T = 48
rs = np.random.RandomState(0)


def text_batch():
    starts = rs.randint(0, len(ids) - T - 1, B)
    rows = np.stack([ids[s:s + T + 1] for s in starts]).astype(np.int32)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:],
            "loss_mask": np.ones((B, T), np.float32)}


data = [text_batch() for _ in range(STEPS)]
model = build(config)
loss_fn = make_loss(model, config)
tx = make_optimizer(3e-3, STEPS, warmup_steps=1)
# one initial state, kept on the host: every layout starts from exactly these numbers
initial = jax.device_get(sharded_init(config, tx, make_mesh("data=1", jax.devices()[:1]))[0])


def laid_out(mesh):
    """The initial state placed on `mesh` by the logical-axis rules, and its shardings."""
    shardings = state_shardings(config, state_shapes(config, tx), mesh, tx)
    return jax.device_put(initial, shardings), shardings


def train_on(spec, devices=None):
    mesh = make_mesh(spec, devices)
    state, shardings = laid_out(mesh)
    step = make_train_step(loss_fn, tx, mesh, shardings)
    losses = []
    for b in data:
        state, metrics = step(state, put_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return losses


def train_pmap():
    state = replicate(initial)
    step = make_pmap_step(loss_fn, tx)
    losses = []
    for b in data:
        state, metrics = step(state, shard_batch(b, jax.local_device_count()))
        losses.append(float(metrics["loss"][0]))
    return losses


# SMALL keeps the one mesh that has all three kinds of parallelism at once
specs = [mixed_spec(N)] if SMALL else [f"data={N}", f"fsdp={N}", f"tensor={N}", mixed_spec(N)]
losses = {"one device": train_on("data=1", jax.devices()[:1])}
for spec in specs:
    losses[spec] = train_on(spec)
losses["pmap"] = train_pmap()
for name, curve in losses.items():
    print(f"{name:24s}", " ".join(f"{x:.5f}" for x in curve))

# %%
reference = np.asarray(losses["one device"])
for name, curve in losses.items():
    np.testing.assert_allclose(curve, reference, rtol=1e-4, err_msg=name)
assert reference[-1] < reference[0] - 0.2, reference  # and the steps do train
print("every layout agrees with one device to 1e-4 (relative); largest gap:",
      max(float(np.max(np.abs(np.asarray(c) - reference))) for c in losses.values()))

# %% [markdown]
# ## What FSDP saves
#
# The train state is the parameters plus AdamW's two moments. With `data` parallelism every
# device keeps all of it; with `fsdp` each device keeps a 1/N slice of every large matrix
# (only the small norm scales, biases and counters stay whole). We count the bytes each device
# really holds, from the arrays' addressable shards.

# %%
def per_device_bytes(tree):
    """The largest number of bytes any one device holds of `tree`."""
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


memory = {spec: per_device_bytes(laid_out(make_mesh(spec))[0])
          for spec in [f"data={N}", f"fsdp={N}", f"tensor={N}", mixed_spec(N)]}
total = sum(x.nbytes for x in jax.tree.leaves(initial))
rep, fsdp = memory[f"data={N}"], memory[f"fsdp={N}"]
print(f"train state {total:,} bytes; per device: replicated {rep:,}, fsdp {fsdp:,} "
      f"({rep / fsdp:.1f}x less with {N} devices)")
assert rep == total  # data parallel: every device holds everything
assert fsdp <= total / N * 1.25, (fsdp, total, N)

fig, ax = plt.subplots(figsize=(6, 3.5))
names = list(memory)
ax.bar(names, [memory[n] / 1024 for n in names], color="tab:blue")
ax.set_ylabel("train state per device (KiB)")
ax.set_title(f"Where the state lives on {N} devices")
plt.setp(ax.get_xticklabels(), rotation=15)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checkpoints and resuming, with the Trainer
#
# `fmzoo.train.train` is what `fmzoo train` runs: it prepares the data (a text file here,
# built into a TFDS dataset), lays the state out on the mesh in the settings, logs metrics,
# saves orbax checkpoints, and with `resume` continues from the latest one: parameters,
# optimizer state, step and the position in the data stream. We run it twice: once straight
# through, and once "killed" a couple of steps after a checkpoint (`stop_after`), then
# resumed. The steps the kill lost are recomputed, and the losses come out identical (to
# the last bit on CPU; a GPU may add in a different order from run to run unless
# `XLA_FLAGS=--xla_gpu_deterministic_ops=true`).

# %%
import inspect
import json
import textwrap as textwrap_module

from fmzoo.train import Settings, train
from fmzoo.train.metrics import read_metrics

corpus = "".join(inspect.getsource(m) for m in (textwrap_module, json.decoder, json.encoder))
with open("corpus.txt", "w") as f:
    f.write(corpus)

SAVE_EVERY = RUN_STEPS // 2


def settings(workdir, **run):
    return Settings.from_dict({
        "model": {"source": "gpt-tiny", "overrides": {"n_layers": N_LAYERS, "d_model": D_MODEL,
                                                      "n_heads": 4, "d_ff": 4 * D_MODEL,
                                                      "max_len": 64}},
        "data": {"name": "corpus.txt", "batch_size": B, "seq_len": 64},
        "optim": {"lr": 3e-3, "warmup": 2},
        "mesh": {"spec": mixed_spec(N)},
        "checkpoint": {"save_every": SAVE_EVERY, "keep": 3},
        "eval": {"every": 0, "sample_tokens": 0},
        "run": {"workdir": workdir, "steps": RUN_STEPS, "log_every": 1, "progress": False,
                **run}})


def logged(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


full = train(settings("runs/full"))
train(settings("runs/killed"), stop_after=SAVE_EVERY + 2)  # dies 2 steps past a checkpoint
print("killed run logged steps", [s for s, _ in logged("runs/killed")])
resumed = train(settings("runs/killed", resume=True))
print("resumed from step", resumed["start_step"], "- final loss", resumed["loss"],
      "vs uninterrupted", full["loss"])

# %%
assert resumed["start_step"] == SAVE_EVERY
if jax.default_backend() == "cpu":  # exact float equality, every step
    assert logged("runs/killed") == logged("runs/full")
else:  # GPU reductions (scatter-adds) need not add in a fixed order from run to run
    np.testing.assert_allclose(logged("runs/killed"), logged("runs/full"), rtol=1e-3)
print(f"all {RUN_STEPS} logged losses of the resumed run equal the uninterrupted run's")

steps_full, loss_full = zip(*logged("runs/full"))
steps_resumed, loss_resumed = zip(*logged("runs/killed")[SAVE_EVERY:])
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(steps_full, loss_full, lw=3, alpha=0.4, label="uninterrupted")
ax.plot(steps_resumed, loss_resumed, "k--", lw=1,
        label=f"resumed from the step-{SAVE_EVERY} checkpoint")
ax.axvline(SAVE_EVERY + 2, color="tab:red", lw=1, ls=":", label="killed here")
ax.set_xlabel("step")
ax.set_ylabel("train loss (nats per byte)")
ax.set_title(f"gpt-tiny on mesh {mixed_spec(N)}")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# A checkpoint does not remember the mesh it was written from: `fmzoo.load` restores the
# parameters onto any mesh (or onto one device), laid out by the same rules.

# %%
import fmzoo

other = make_mesh(f"fsdp={N}")
on_mesh = fmzoo.load("runs/full", mesh=other)
plain = fmzoo.load("runs/full")
emb = on_mesh.params["embed"]["embedding"]
print("embedding restored as", emb.sharding.spec, "on", dict(other.shape))
np.testing.assert_array_equal(np.asarray(emb), np.asarray(plain.params["embed"]["embedding"]))
