"""The SFT step on 8 simulated devices: TRL metric names, counts summed over devices and
microbatches, completion-only labels, and LoRA (only adapters change, optimiser state only
for them, mesh == single device == pmap)."""

import jax
import numpy as np
import optax
import pytest

from fmzoo.models.lora import LoraSpec, merge
from fmzoo.models.registry import build
from fmzoo.train.mesh import make_mesh, put_batch
from fmzoo.train.optim import make_optimizer
from fmzoo.train.sft import sft_loss
from fmzoo.train.state import (init_train_state, lora_loss, lora_optimizer, sharded_init)
from fmzoo.train.step import make_pmap_step, make_train_step, replicate, shard_batch
from train_helpers import lm_batch, local_numpy, tiny_config

SPEC = LoraSpec(rank=2, alpha=4.0)


def _data(n=3, seed=0):
    rs = np.random.RandomState(seed)
    out = [lm_batch(rs) for _ in range(n)]
    out[0]["loss_mask"][3] = 0  # a row with no label: weighs nothing, never a NaN
    return out


@pytest.fixture(scope="module")
def setup():
    config = tiny_config("llama")
    loss = lora_loss(sft_loss(build(config), config), SPEC)
    tx = lora_optimizer(make_optimizer(1e-2, 10, warmup_steps=2))
    return config, loss, tx


def _mesh_run(setup, spec, devices=None, accum=1):
    config, loss, tx = setup
    mesh = make_mesh(spec, devices)
    state, shardings = sharded_init(config, tx, mesh, lora=SPEC)
    first = local_numpy(state.params)  # the state is donated to the step
    step = make_train_step(loss, tx, mesh, shardings, accum_steps=accum)
    rows = []
    for b in _data():
        state, m = step(state, put_batch(b, mesh))
        rows.append({k: float(v) for k, v in m.items()})
    return rows, state, first


def test_metrics_carry_trl_names_and_counts_sum():
    config = tiny_config("llama")
    b = _data()[0]
    loss, m = sft_loss(build(config), config)(
        init_train_state(config, optax.sgd(0.1)).params, b, None)
    assert set(m) == {"loss", "mean_token_accuracy", "tokens", "num_tokens"}
    assert float(m["num_tokens"]) == (b["segment_ids"] > 0).sum()
    assert float(m["tokens"]) == b["loss_mask"].sum()
    assert np.isfinite(float(loss))


def test_unlabelled_targets_change_nothing():
    """Completion-only: a prompt token's target (mask 0) can be anything."""
    config = tiny_config("llama")
    params = init_train_state(config, optax.sgd(0.1)).params
    fn = jax.jit(jax.value_and_grad(lambda p, b: sft_loss(build(config), config)(p, b)[0]))
    b = _data()[0]
    other = dict(b, targets=np.where(b["loss_mask"] > 0, b["targets"],
                                     (b["targets"] + 7) % 256).astype(np.int32))
    (l1, g1), (l2, g2) = fn(params, b), fn(params, other)
    assert float(l1) == float(l2)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), g1, g2)
    moved = dict(b, targets=np.where(b["loss_mask"] > 0, (b["targets"] + 7) % 256,
                                     b["targets"]).astype(np.int32))
    assert float(fn(params, moved)[0]) != float(l1)  # labelled targets do count


def test_lora_mesh_equals_single_device_equals_pmap_and_trains_only_adapters(setup):
    config, loss, tx = setup
    single, s1, fresh = _mesh_run(setup, "data=1", jax.devices()[:1])
    sharded, s8, _ = _mesh_run(setup, "data=2,fsdp=2,tensor=2", accum=2)
    state = replicate(init_train_state(config, tx, lora=SPEC))
    step = make_pmap_step(loss, tx)
    pm = []
    for b in _data():
        state, m = step(state, shard_batch(b, jax.local_device_count()))
        pm.append({k: float(np.asarray(v)[0]) for k, v in m.items()})
    for rows in (sharded, pm):
        for a, b in zip(rows, single):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
            np.testing.assert_allclose(a["mean_token_accuracy"], b["mean_token_accuracy"],
                                       rtol=1e-5)
            assert a["num_tokens"] == b["num_tokens"] == 16 * 13  # summed, not averaged
    assert single[-1]["loss"] < single[0]["loss"]
    p1, p8 = local_numpy(s1.params), local_numpy(s8.params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=5e-5, rtol=1e-4), p1, p8)
    # the base is frozen bit for bit; every adapter moved
    jax.tree.map(np.testing.assert_array_equal, p1["base"], fresh["base"])
    moved = jax.tree.map(lambda x, y: not np.array_equal(x, y), p1["lora"], fresh["lora"])
    assert jax.tree.leaves(moved) and all(jax.tree.leaves(moved))
    # AdamW moments exist for the adapters only
    n_adapter = sum(x.size for x in jax.tree.leaves(p1["lora"]))
    n_state = sum(x.size for x in jax.tree.leaves(s1.opt_state) if x.ndim > 0)
    assert n_state == 2 * n_adapter
    # the merged model is what the loss saw
    merged = merge(p1["base"], p1["lora"], SPEC)
    assert jax.tree.structure(merged) == jax.tree.structure(p1["base"])
    b = _data()[0]
    np.testing.assert_allclose(
        float(sft_loss(build(config), config)(merged, b)[0]),
        float(loss(p1, b, None)[0]), rtol=1e-6)
