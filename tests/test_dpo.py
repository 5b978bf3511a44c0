"""The DPO family: TRL's losses written out by hand, the step loss on hand-made preference
batches (issue 11 contract), the frozen reference through the steps (mesh, pmap,
microbatches, LoRA), precomputed == in-step reference, and short runs of `fmzoo dpo`."""

import math

import jax
import numpy as np
import optax
import pytest

from fmzoo.models.registry import build
from fmzoo.train.dpo_losses import dpo_loss, dpo_step_loss, sequence_logps
from fmzoo.train.mesh import make_mesh, put_batch
from fmzoo.train.state import init_train_state, sharded_init
from fmzoo.train.step import (bind_frozen, make_eval_step, make_pmap_step, make_train_step,
                              replicate, shard_batch)
from train_helpers import local_numpy, tiny_config


def pref_batch(rs, B=8, T=16, side="right", extra_pad=0):
    """Contract-format pairs: [BOS] prompt + response + EOS, padded to T + extra_pad."""
    T2 = T + extra_pad
    tokens = np.zeros((B, 2, T2), np.int32)
    mask = np.zeros((B, 2, T2), np.int32)
    resp = np.zeros((B, 2, T2), np.float32)
    for b in range(B):
        prompt = [1] + list(rs.randint(3, 250, rs.randint(2, 6)))
        for j in range(2):
            r = list(rs.randint(3, 250, rs.randint(1, T - len(prompt) - 1))) + [2]
            row = prompt + r
            n = len(row)
            at = 0 if side == "right" else T2 - n
            tokens[b, j, at:at + n] = row
            mask[b, j, at:at + n] = 1
            resp[b, j, at + len(prompt):at + n] = 1
    return dict(tokens=tokens, mask=mask, response_mask=resp,
                margin=np.zeros(B, np.float32), index=np.arange(B, dtype=np.int32))


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config("llama")
    model = build(config)
    params = init_train_state(config, optax.sgd(0.1)).params
    return config, model, params


# ----------------------------------------------------------------------------- dpo_loss

def _logsig(x):
    return -np.log1p(np.exp(-x))


def test_each_loss_type_matches_its_formula_by_hand():
    rs = np.random.RandomState(0)
    c, r, rc, rr = (rs.randn(6).astype(np.float32) * 3 for _ in range(4))
    beta, eps = 0.3, 0.2
    h = (c - r) - (rc - rr)
    want = {
        ("sigmoid", 0.0): -_logsig(beta * h),
        ("sigmoid", eps): -_logsig(beta * h) * (1 - eps) - _logsig(-beta * h) * eps,
        ("robust", eps): (-_logsig(beta * h) * (1 - eps) + _logsig(-beta * h) * eps)
        / (1 - 2 * eps),
        ("hinge", 0.0): np.maximum(0.0, 1 - beta * h),
        ("ipo", 0.0): (h - 1 / (2 * beta)) ** 2,
        ("simpo", eps): -_logsig(beta * (c - r - 0.5 / beta)) * (1 - eps)
        - _logsig(-beta * (c - r - 0.5 / beta)) * eps,
    }
    for (kind, ls), expected in want.items():
        losses, cr, rj = dpo_loss(c, r, rc, rr, beta=beta, loss_type=kind, label_smoothing=ls)
        np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6, err_msg=kind)
        ref_c, ref_r = (0, 0) if kind == "simpo" else (rc, rr)
        np.testing.assert_allclose(cr, beta * (c - ref_c), rtol=1e-6)
        np.testing.assert_allclose(rj, beta * (r - ref_r), rtol=1e-6)


def test_rewards_carry_no_gradient_and_bad_knobs_are_refused():
    g = jax.grad(lambda c: dpo_loss(c, 0.0, 0.0, 0.0, beta=0.1)[1].sum())(1.0)
    assert float(g) == 0.0
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match=r"beta must be > 0 .*--beta 0.1"):
            dpo_loss(1.0, 0.0, 0.0, 0.0, beta=beta)
    with pytest.raises(ValueError, match="loss_type 'kto' is not one of sigmoid"):
        dpo_loss(1.0, 0.0, 0.0, 0.0, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(1.0, 0.0, 0.0, 0.0, beta=0.1, label_smoothing=0.5)


# ----------------------------------------------------------------------------- log-probs

def test_logps_ignore_padding_amount_and_side(tiny):
    config, model, params = tiny
    got = []
    for side, extra in (("right", 0), ("right", 7), ("left", 0), ("left", 5)):
        b = pref_batch(np.random.RandomState(1), side=side, extra_pad=extra)
        out = jax.jit(lambda p, b: sequence_logps(model, p, b))(params, b)
        got.append({k: np.asarray(v) for k, v in out.items()})
    for other in got[1:]:
        for k in got[0]:
            np.testing.assert_allclose(other[k], got[0][k], rtol=1e-5, atol=1e-5, err_msg=k)
    b = pref_batch(np.random.RandomState(1))
    np.testing.assert_array_equal(got[0]["counts"], b["response_mask"][..., 1:].sum(-1))


def test_logps_are_the_response_tokens_log_probs(tiny):
    config, model, params = tiny
    b = pref_batch(np.random.RandomState(2), B=2)
    out = sequence_logps(model, params, b)
    row = b["tokens"][1, 0]
    n = int(b["mask"][1, 0].sum())
    logits = np.asarray(model.apply({"params": params}, row[None, :n]))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    resp = b["response_mask"][1, 0, 1:n]
    want = sum(logp[t, row[t + 1]] * resp[t] for t in range(n - 1))
    np.testing.assert_allclose(float(out["logps"][1, 0]), want, rtol=1e-4)


# ----------------------------------------------------------------------------- step loss

def test_at_init_sigmoid_loss_is_ln2_and_rewards_zero(tiny):
    config, model, params = tiny
    b = pref_batch(np.random.RandomState(3))
    b["tokens"][2] = 0
    b["mask"][2] = 0
    b["response_mask"][2] = 0  # a padding pair: no NaN, not counted
    loss, m = dpo_step_loss(model, config, beta=0.1)(params, b, None, params)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(m[k]) == 0.0, k
    assert float(m["tokens"]) == 7.0
    assert float(m["num_tokens"]) == b["mask"].sum()
    assert {"logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
            "loss"} <= set(m)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        dpo_step_loss(model, config, beta=0.1)(params, b, None)


def test_precomputed_reference_gives_the_in_step_losses(tiny):
    from fmzoo.train.dpo_losses import reference_logps
    config, model, params = tiny
    b = pref_batch(np.random.RandomState(4))
    policy = jax.tree.map(lambda x: x * 1.1, params)
    for kind in ("sigmoid", "ipo"):
        fn = dpo_step_loss(model, config, beta=0.1, loss_type=kind)
        in_step = fn(policy, b, None, params)[1]
        pre = dict(b, ref_logps=np.asarray(reference_logps(model, params, b)))
        precomputed = fn(policy, pre, None)[1]
        for k in in_step:
            np.testing.assert_allclose(precomputed[k], in_step[k], rtol=1e-6, err_msg=k)
        assert float(in_step["loss"]) != pytest.approx(math.log(2), abs=1e-4)


# ----------------------------------------------------------------------------- the steps

def _policy_params(params):
    """A policy that has moved away from the reference (so rewards and losses are not 0)."""
    leaves, tree = jax.tree.flatten(params)
    rs = np.random.RandomState(5)
    return jax.tree.unflatten(tree, [x + 0.02 * rs.randn(*x.shape).astype(x.dtype)
                                     for x in leaves])


def _mesh_steps(tiny, spec, accum=1, n=2):
    from fmzoo.train.trainer import _place
    config, model, ref = tiny
    tx = optax.sgd(0.5)  # plain SGD: params compare as closely as the gradients
    n_dev = int(np.prod([int(x.split("=")[1]) for x in spec.split(",")]))
    mesh = make_mesh(spec, jax.devices()[:n_dev])
    _, shardings = sharded_init(config, tx, mesh)
    state = jax.jit(lambda p: init_train_state(config, tx).replace(params=p,
                                                                   opt_state=tx.init(p)),
                    out_shardings=shardings)(_policy_params(ref))
    frozen = jax.tree.map(_place, ref, shardings.params)
    step = make_train_step(dpo_step_loss(model, config, beta=0.1), tx, mesh, shardings,
                           accum_steps=accum, frozen_shardings=shardings.params)
    step = bind_frozen(step, frozen)
    rows = []
    for i in range(n):
        state, m = step(state, put_batch(pref_batch(np.random.RandomState(10 + i)), mesh))
        rows.append({k: float(v) for k, v in m.items()})
    return rows, local_numpy(state.params)


def test_mesh_single_device_pmap_and_microbatches_agree(tiny):
    config, model, ref = tiny
    one, p_one = _mesh_steps(tiny, "data=1")
    for spec, accum in (("data=2,fsdp=2,tensor=2", 1), ("data=2", 2)):
        rows, p = _mesh_steps(tiny, spec, accum)
        for a, b in zip(one, rows):
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=2e-4, abs=1e-6), (spec, accum, k)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), p_one, p)
    assert one[0]["tokens"] == 8.0 and abs(one[0]["rewards/margins"]) > 1e-4
    # pmap: the frozen reference replicated like the state
    tx = optax.sgd(0.5)
    state = init_train_state(config, tx)
    p0 = _policy_params(ref)
    state = replicate(state.replace(params=p0, opt_state=tx.init(p0)))
    step = make_pmap_step(dpo_step_loss(model, config, beta=0.1), tx, frozen=True)
    rep_ref = replicate(ref)
    for i, want in enumerate(one):
        state, m = step(state, shard_batch(pref_batch(np.random.RandomState(10 + i)), 8),
                        rep_ref)
        for k in want:
            assert float(m[k][0]) == pytest.approx(want[k], rel=2e-4, abs=1e-6), ("pmap", k)
    with pytest.raises(TypeError, match=r"call it as step\(state, batch, frozen\)"):
        step(state, shard_batch(pref_batch(np.random.RandomState(0)), 8))


def test_reference_gets_no_gradient_and_eval_step_takes_it(tiny):
    config, model, ref = tiny
    loss = dpo_step_loss(model, config, beta=0.1, deterministic=True)
    b = pref_batch(np.random.RandomState(6))
    g = jax.grad(lambda f: loss(_policy_params(ref), b, None,
                                jax.lax.stop_gradient(f))[0])(ref)
    assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
    mesh = make_mesh("data=4,tensor=2")
    from fmzoo.models.registry import param_shardings_for
    sh = param_shardings_for(config, mesh)
    ev = make_eval_step(loss, mesh, sh, frozen_shardings=sh)
    m = ev(jax.device_put(ref, sh), put_batch(b, mesh), jax.device_put(ref, sh))
    assert float(m["loss"]) == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------- fmzoo dpo

TINY_LM = dict(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pref_data"))


def _settings(workdir, data_dir, **sections):
    from fmzoo.train.dpo import DPOSettings
    d = {"model": {"source": "llama-tiny", "overrides": TINY_LM},
         "data": {"name": "tasks/add", "batch_size": 8, "max_length": 48, "data_dir": data_dir},
         "eval": {"every": 0, "batches": 2, "examples": 0, "at_start": False},
         "run": {"workdir": str(workdir), "steps": 4, "progress": False, "log_every": 1},
         "checkpoint": {"save_every": 2, "async_save": False}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return DPOSettings.from_dict(d)


def _rows(workdir):
    import json
    with open(f"{workdir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _train_rows(workdir):
    drop = ("tokens_per_s", "truncated_pairs")
    return {r["step"]: {k: v for k, v in r.items() if k not in drop}
            for r in _rows(workdir) if "loss" in r}


def test_precomputed_reference_and_resume_give_the_same_run(tmp_path, data_dir):
    """One run with --precompute-ref straight to step 4; one with the in-step reference
    stopped at step 2 and resumed: every logged value agrees."""
    from fmzoo.train.dpo import dpo, prepare_dpo
    from fmzoo.train.dpo_ref import DIR
    opt = {"lr": 1e-2, "warmup": 1}
    dpo(_settings(tmp_path / "pre", data_dir, optim=opt, dpo={"precompute_ref": True}))
    import os
    stored = os.listdir(os.path.join(data_dir, DIR))
    assert sorted(f.rsplit(".", 1)[1] for f in stored) == ["json", "json", "npz", "npz"]
    dpo(_settings(tmp_path / "in", data_dir, optim=opt), stop_after=2)
    with pytest.raises(ValueError, match="--resume: the reference model is reloaded from"):
        prepare_dpo(_settings(tmp_path / "in", data_dir, optim=opt,  # another init seed
                              run={"resume": True, "seed": 1}))
    dpo(_settings(tmp_path / "in", data_dir, optim=opt, run={"resume": True}))
    pre, resumed = _train_rows(tmp_path / "pre"), _train_rows(tmp_path / "in")
    assert sorted(pre) == sorted(resumed) == [1, 2, 3, 4]
    assert pre[4]["loss"] < math.log(2) - 1e-3  # the policy moved
    for step in pre:
        for k, v in pre[step].items():
            assert resumed[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)


def test_lora_reference_is_the_frozen_base(tiny):
    from fmzoo.models.lora import LoraSpec, init_adapters
    from fmzoo.train.state import lora_loss
    config, model, base = tiny
    spec = LoraSpec(rank=2, alpha=4.0)
    params = {"base": base, "lora": init_adapters(base, spec, jax.random.key(1))}
    loss = lora_loss(dpo_step_loss(model, config, beta=0.1), spec, base_as_frozen=True)
    b = pref_batch(np.random.RandomState(7))
    (value, m), g = jax.value_and_grad(loss, has_aux=True)(params, b, None)
    assert float(value) == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == base
    assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["base"]))
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g["lora"])) > 0


def test_trainer_refuses_a_reference_of_another_architecture(tmp_path, tiny):
    from fmzoo.train.checkpoint import CheckpointError
    from fmzoo.train.trainer import Trainer
    config, model, params = tiny
    s = _settings(tmp_path / "w", str(tmp_path))
    other = init_train_state(tiny_config("gpt"), optax.sgd(0.1)).params
    with pytest.raises(CheckpointError, match="the frozen .reference. weights do not fit the "
                                              "model: .*same architecture"):
        Trainer(s, config, lambda: None, frozen=other)
    with pytest.raises(ValueError, match="only frozen='lora_base' .with LoRA"):
        Trainer(s, config, lambda: None, frozen="lora_base")
    assert not (tmp_path / "w").exists()


def test_ref_table_refuses_changed_or_missing_records(tmp_path):
    from fmzoo.train.dpo_ref import WithRefLogps, compute_table, load_table, _save_table
    batches = [pref_batch(np.random.RandomState(s), B=4) for s in (20, 21)]
    batches[1]["index"] += 4
    batches[1]["mask"][3] = 0  # a padding row of a last, partial batch
    batches[1]["index"][3] = 0
    table = compute_table(lambda b: np.stack([b["index"], -b["index"]], 1) + 0.5, batches)
    assert table.known.tolist() == [True] * 7
    path = str(tmp_path / "t.npz")
    _save_table(path, {"k": 1}, table)
    assert load_table(path, {"k": 2}) is None  # another reference / data: not this table
    table = load_table(path, {"k": 1})
    it = WithRefLogps(iter(batches), table)
    np.testing.assert_array_equal(next(it)["ref_logps"][:, 0], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(next(it)["ref_logps"][:, 0], [4.5, 5.5, 6.5, 0.0])
    changed = pref_batch(np.random.RandomState(20), B=4)
    changed["tokens"][2, 1, 1] += 1
    with pytest.raises(ValueError, match=r"computed for other tokens at record\(s\) \[2\].*"
                                         r"delete that file"):
        table.lookup(changed)
    changed = pref_batch(np.random.RandomState(20), B=4)
    changed["index"][0] = 9
    with pytest.raises(ValueError, match=r"have no entry for record\(s\) \[9\]"):
        table.lookup(changed)
