"""Shared by the training tests and the multi-host worker: tiny configs, fixed batches, and
a few steps of training on a mesh."""

from __future__ import annotations

import jax
import numpy as np

from fmzoo.models import get_config
from fmzoo.models.registry import build
from fmzoo.train.losses import make_loss
from fmzoo.train.mesh import make_mesh, put_batch
from fmzoo.train.optim import make_optimizer
from fmzoo.train.state import sharded_init

TINY = {
    "gpt": ("gpt-tiny", dict(n_layers=1, d_model=32, n_heads=4, d_ff=64, max_len=32)),
    "llama": ("llama-tiny", dict(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                 max_len=32)),
    "encdec": ("transformer-seq2seq", dict(n_encoder_layers=1, n_decoder_layers=1, d_model=32,
                                           n_heads=4, d_ff=64, max_len=32)),
    "rnn": ("rnn-seq2seq-attn", dict(d_embed=16, d_hidden=32, max_len=32)),
}


def tiny_config(family: str):
    name, kw = TINY[family]
    return get_config(name, **kw)


def lm_batch(rs: np.random.RandomState, B: int = 16, T: int = 16) -> dict:
    """Two packed documents per row with a padded tail and a ragged loss mask."""
    x = rs.randint(0, 256, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2
    seg[:, T - 3:] = 0
    pos = np.where(seg == 1, np.arange(T), np.arange(T) - T // 2).astype(np.int32) * (seg > 0)
    mask = ((rs.rand(B, T) > 0.2) & (seg > 0)).astype(np.float32)
    return dict(inputs=x[:, :-1], targets=x[:, 1:], loss_mask=mask, positions=pos,
                segment_ids=seg)


def seq2seq_batch(rs: np.random.RandomState, B: int = 16, S: int = 12, T: int = 10) -> dict:
    src_len = rs.randint(1, S + 1, B)
    tgt_len = rs.randint(1, T + 1, B)
    src_mask = np.arange(S)[None] < src_len[:, None]
    tgt_mask = np.arange(T)[None] < tgt_len[:, None]
    src = np.where(src_mask, rs.randint(0, 256, (B, S)), 256).astype(np.int32)
    tgt = np.where(np.arange(T + 1)[None] <= tgt_len[:, None], rs.randint(0, 256, (B, T + 1)),
                   256).astype(np.int32)
    return dict(src=src, src_mask=src_mask, tgt_in=tgt[:, :-1], tgt_out=tgt[:, 1:],
                tgt_mask=tgt_mask)


def batches(family: str, n: int, seed: int = 0, B: int = 16) -> list[dict]:
    rs = np.random.RandomState(seed)
    make = lm_batch if family in ("gpt", "llama") else seq2seq_batch
    return [make(rs, B) for _ in range(n)]


def setup(config, lr: float = 1e-2, total_steps: int = 10):
    model = build(config)
    return make_loss(model, config), make_optimizer(lr, total_steps, warmup_steps=2)


def train_on_mesh(config, batch_list, spec, devices=None, accum: int = 1):
    """(losses, final state) after one step per batch; batches are this process's rows."""
    from fmzoo.train.step import make_train_step
    loss_fn, tx = setup(config)
    mesh = make_mesh(spec, devices)
    state, shardings = sharded_init(config, tx, mesh)
    step = make_train_step(loss_fn, tx, mesh, shardings, accum_steps=accum)
    losses = []
    for b in batch_list:
        state, m = step(state, put_batch(b, mesh))
        losses.append(float(m["loss"]))
    return losses, state


def local_numpy(tree):
    """Host copies of (possibly sharded) arrays."""
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


class ListBatches:
    """The smallest batch source: a list replayed in order, its position as state."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.items[(self.i - 1) % len(self.items)]

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]
