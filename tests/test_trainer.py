"""The Trainer with a command of its own (a loss, in-memory batches, an extra metric), the
divergence guard (never a non-finite checkpoint, the real cause named), the workdir lock,
bf16 compute, --dtype/--remat reaching the model config, and a torn metrics line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models.config import ConfigError
from fmzoo.models.registry import build
from fmzoo.train import checkpoint as ckpt_lib
from fmzoo.train.config import Settings
from fmzoo.train.losses import make_loss
from fmzoo.train.metrics import read_metrics, truncate_metrics
from fmzoo.train.pretrain import starting_point
from fmzoo.train.trainer import Task, Trainer, TrainingDiverged
from train_helpers import ListBatches, batches, tiny_config, train_on_mesh


def settings(workdir, **sections):
    base = dict(data=dict(batch_size=16), optim=dict(lr=1e-2, warmup=0),
                mesh=dict(spec="data=8"), checkpoint=dict(save_every=2, keep=2),
                eval=dict(every=0, batches=2, sample_tokens=0),
                run=dict(workdir=str(workdir), steps=2, log_every=1, progress=False))
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return Settings.from_dict(base)


def lm_task(config, loss_wrap=None):
    loss = make_loss(build(config), config)
    if loss_wrap is not None:
        loss = loss_wrap(loss)
    data = batches("gpt", 4)
    return Task(loss_fn=loss, batches=ListBatches(data), eval_batches=lambda: iter(data[:2]),
                metrics=lambda m: {"double_loss": 2 * m["loss"]})


def test_a_command_brings_loss_batches_and_metrics(tmp_path):
    config = tiny_config("gpt")
    summary = Trainer(settings(tmp_path / "w"), config, lm_task(config)).run()
    rows = read_metrics(tmp_path / "w")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(r["double_loss"] == 2 * r["loss"] for r in train_rows)
    assert train_rows[1]["tokens_per_s"] > 0 and "tokens_per_s" not in train_rows[0]
    assert {"eval_loss", "eval_accuracy"} <= set(rows[-1]) and rows[-1]["step"] == 2
    assert summary["step"] == 2 and summary["tokens_seen"] == train_rows[-1]["tokens_seen"]
    assert ckpt_lib.Checkpointer(str(tmp_path / "w")).latest_step() == 2
    run = json.load(open(tmp_path / "w" / "fmzoo_run.json"))
    assert run["model_config"] == config.to_dict()
    assert run["settings"]["optim"]["lr"] == 1e-2


def test_nan_before_any_update_blames_the_model_config(tmp_path):
    """norm_eps=0 and a constant input to the first LayerNorm: x / sqrt(0) before any update;
    the message names the config and the weights, not the learning rate."""
    from fmzoo.models import init
    config = tiny_config("gpt").replace(norm_eps=0.0)
    params = jax.tree.map(np.array, init(config, 0))  # writable host copies
    params["embed"]["embedding"][:] = 0.0
    params["pos_embed"]["embedding"][:] = 0.0
    with pytest.raises(TrainingDiverged, match=r"loss nan.* at step 1, before any update: the "
                       r"model with its starting weights \(runs/base\) produces non-finite "
                       r"values, so the learning rate is not the cause; suspicious: "
                       r"norm_eps=0.0\. Nothing was saved"):
        Trainer(settings(tmp_path / "w"), config, lm_task(config), init_params=params,
                init_info={"kind": "workdir", "source": "runs/base"}).run()
    assert ckpt_lib.committed_steps(str(tmp_path / "w" / "checkpoints")) == []
    params["embed"]["embedding"][0, 0] = np.nan
    with pytest.raises(ckpt_lib.CheckpointError, match=r"the starting weights \(runs/base\) "
                       r"hold NaN or Inf in \['embed'\]\['embedding'\]"):
        Trainer(settings(tmp_path / "w2"), config, lm_task(config), init_params=params,
                init_info={"kind": "workdir", "source": "runs/base"}).run()


def test_nonfinite_gradient_with_finite_loss_is_caught(tmp_path):
    def wrap(loss):
        def with_kink(params, batch, rng):
            value, m = loss(params, batch, rng)
            w = params["embed"]["embedding"]
            kink = jnp.sqrt(jnp.abs(w[0, 0] - w[0, 0]))  # 0, but its gradient is not finite
            return value + kink, {**m, "loss": value + kink}
        return with_kink
    config = tiny_config("gpt")
    with pytest.raises(TrainingDiverged,
                       match=r"grad_norm nan.* at step 1, before any update: the model"):
        Trainer(settings(tmp_path / "w"), config, lm_task(config, wrap)).run()


def test_nonfinite_updated_params_are_never_saved(tmp_path):
    """Loss and gradients finite, the update overflows: the state must not be saved (it used
    to be, and then called the last good checkpoint)."""
    config = tiny_config("gpt")
    s = settings(tmp_path / "w", optim=dict(lr=3.4e38, clip_norm=0.0),
                 checkpoint=dict(save_every=1))
    with pytest.raises(TrainingDiverged, match=r"non-finite values at step 1 \((param_norm inf|"
                       r"params nan)\); stopping without saving\. no checkpoint had been "
                       r"written yet\. Lower --lr \(now 3\.4e\+38\)"):
        Trainer(s, config, lm_task(config)).run()
    assert ckpt_lib.committed_steps(str(tmp_path / "w" / "checkpoints")) == []


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    config = tiny_config("gpt")
    work = tmp_path / "w"
    with ckpt_lib.workdir_lock(str(work)):
        trainer = Trainer(settings(work), config, lm_task(config))
        with pytest.raises(ckpt_lib.CheckpointError, match=r"is in use by run pid \d+"):
            trainer.run()
    assert not os.path.exists(work / "metrics.jsonl")


def test_bf16_compute_tracks_fp32_and_keeps_fp32_params():
    fp32 = tiny_config("gpt")
    data = batches("gpt", 3, B=8)
    one = jax.devices()[:1]
    losses32, _ = train_on_mesh(fp32, data, "data=1", one)
    losses16, state = train_on_mesh(fp32.replace(dtype="bfloat16"), data, "data=1", one)
    assert losses16 != losses32
    np.testing.assert_allclose(losses16, losses32, rtol=2e-3)
    def rounded_to_bf16(config):  # the logits are computed in bf16 (then cast to fp32)
        logits = np.asarray(build(config).apply({"params": state.params}, data[0]["inputs"]))
        return np.array_equal(logits, logits.astype(jnp.bfloat16).astype(np.float32))
    assert rounded_to_bf16(fp32.replace(dtype="bfloat16")) and not rounded_to_bf16(fp32)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype("float32")}


def test_dtype_and_remat_flags_reach_the_model_config(tmp_path):
    s = settings(tmp_path / "w", model=dict(source="llama-tiny", dtype="bfloat16", remat="full",
                                            overrides={"n_layers": 1}))
    config, params, tok, info = starting_point(s)
    assert (config.dtype, config.param_dtype, config.remat, config.n_layers) == \
        ("bfloat16", "float32", "full", 1)
    assert params is None and tok is None and info == {"kind": "preset", "source": "llama-tiny"}
    with pytest.raises(ConfigError, match="unknown model 'gpt-tiyn'|gpt-tiny"):
        starting_point(settings(tmp_path / "w", model=dict(source="gpt-tiyn")))


def test_torn_last_metrics_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    truncate_metrics(str(tmp_path), 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text('{"step": 1, "loss": 2.0}\ngarbage\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics row"):
        read_metrics(tmp_path)


def test_starting_point_from_a_hugging_face_dir(tmp_path):
    """--model HF_DIR: the weights come from the directory, overrides that keep the shapes
    apply, and one that changes them is refused."""
    from fmzoo.models import get_config, init
    from fmzoo.models.hf import to_hf
    config = get_config("llama-tiny", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                        max_len=32)
    params = init(config, 3)
    to_hf(params, config, str(tmp_path / "hf"))
    s = settings(tmp_path / "w", model=dict(source=str(tmp_path / "hf"), remat="dots"))
    loaded, got, _, info = starting_point(s)
    assert info == {"kind": "hf", "source": str(tmp_path / "hf"),
                    "generation": {"do_sample": False, "eos_token_id": config.eos_id}}
    assert loaded.remat == "dots" and loaded.d_model == 32 and loaded.param_dtype == "float32"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match=r"override\(s\) d_ff would change the shapes"):
        starting_point(settings(tmp_path / "w", model=dict(source=str(tmp_path / "hf"),
                                                           overrides={"d_ff": 128})))


def test_gradient_clipping_and_schedule():
    """Clipping scales what AdamW sees (its first moment), and only above the threshold;
    the schedule warms up linearly, peaks, and decays to a tenth."""
    from fmzoo.train.optim import lr_schedule, make_optimizer
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    grads = jax.tree.map(lambda p: 5.0 * jnp.ones_like(p), params)  # global norm 5 * sqrt(6)
    norm = float(np.sqrt(6) * 5.0)

    def first_moment(clip):
        tx = make_optimizer(1e-3, 10, clip_norm=clip)
        _, state = tx.update(grads, tx.init(params), params)
        adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu"))
                if hasattr(s, "mu")][0]
        return float(adam.mu["w"][0, 0])
    np.testing.assert_allclose(first_moment(1.0), 0.1 * 5.0 / norm, rtol=1e-5)
    np.testing.assert_allclose(first_moment(0.0), 0.1 * 5.0, rtol=1e-5)  # 0: off
    np.testing.assert_allclose(first_moment(100.0), 0.1 * 5.0, rtol=1e-5)  # below: unchanged
    sched = lr_schedule(1.0, 100, warmup_steps=10)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 100)], [0, 0.5, 1, 0.1],
                               atol=1e-6)
