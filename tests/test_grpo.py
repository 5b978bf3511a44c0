"""GRPO / RLOO on the Trainer (train/grpo.py, train/onpolicy.py, train/prompt_data.py): the
first update of a fresh rollout, learning on a toy reward, resume, sharding, bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fmzoo.models import build, get_config
from fmzoo.models.tokenizer import ByteTokenizer

TINY_LM = dict(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)


def _settings(workdir, **sections):
    from fmzoo.train.grpo import GRPOSettings
    d = {"model": {"source": "llama-tiny", "overrides": TINY_LM},
         "data": {"name": "tasks/add", "batch_size": 16, "max_length": 40},
         "eval": {"every": 0, "examples": 0, "at_start": False},
         "grpo": {"num_generations": 4, "max_new_tokens": 8},
         "optim": {"lr": 3e-3, "warmup": 0},
         "run": {"workdir": str(workdir), "steps": 4, "progress": False, "log_every": 1},
         "checkpoint": {"save_every": 2, "async_save": False}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return GRPOSettings.from_dict(d)


def _train_rows(workdir):
    with open(f"{workdir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    timing = ("tokens_per_s", "timing/rollout_s", "rollout_tokens_per_s")
    return {r["step"]: {k: v for k, v in r.items() if k not in timing}
            for r in rows if "loss" in r}


def test_prompts_are_the_sft_prompts():
    from fmzoo.train import prompt_data, sft_data
    tok = ByteTokenizer()
    got = prompt_data.load_prompts("tasks/add", tok, split="validation")
    want = sft_data.sft_eval_prompts("tasks/add", tok, "validation", 200)  # TFDS shuffled
    assert len(got) == len(want) == 200
    assert sorted((p["prompt_ids"], p["columns"]["answer"]) for p in got) == \
        sorted((w["prompt_ids"], w["answer"]) for w in want)


def test_prompt_files_and_their_errors(tmp_path):
    from fmzoo.train import prompt_data
    from fmzoo.train.text_data import UserDataError
    tok = ByteTokenizer()
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hi", "answer": "1"}\n\n'
                 '{"prompt": [{"role": "user", "content": "Yo"}], "answer": "2"}\n')
    got = prompt_data.load_prompts(str(f), tok)
    assert got[0]["prompt_ids"] == tok.encode("Hi", add_bos=True)
    assert got[1]["prompt_text"] == "Yo" and prompt_data.columns(got) == {"answer": ["1", "2"]}
    assert prompt_data.eval_split(str(f)) is None
    for text, match in (('{"prompt": ""}', "non-empty string"),
                        ('{"messages": []}', "online RL needs prompts only"),
                        ('{"prompt": "a"}\n{"prompt": "b", "x": 1}', "same extra keys"),
                        ("[1]", "not a JSON object")):
        f.write_text(text)
        with pytest.raises(UserDataError, match=match):
            prompt_data.load_prompts(str(f), tok)


def test_first_update_of_a_fresh_rollout_has_ratio_one(toy_reward):
    """On the rollout's own policy the ratio is 1: nothing clipped, KL 0 against itself,
    and the grpo loss is minus the rows' mean advantage (0 for group-centred ones)."""
    from fmzoo.train import prompt_data
    from fmzoo.train.grpo import GRPOSection, grpo_loss, make_grpo_rollout
    from fmzoo.train.onpolicy import PolicyView
    from fmzoo.train.rewards import load_rewards
    config = get_config("llama-tiny", **TINY_LM)
    model, tok = build(config), ByteTokenizer()
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    s = GRPOSection(num_generations=4, max_new_tokens=8, beta=0.1, steps_per_generation=2)
    make = make_grpo_rollout(model, tok, load_rewards(f"{toy_reward}:ascii_share"), s,
                             batch_size=8, max_length=40)
    prompts = prompt_data.load_prompts("tasks/add", tok, limit=4)
    view = PolicyView(params, params, None, 0, jax.random.key(3))
    batches, metrics = make(view, prompts)
    assert len(batches) == 2 and all(b["tokens"].shape == (8, 40) for b in batches)
    assert 0.2 < metrics["reward"] < 0.8
    assert metrics["rewards/toy_rl_rewards:ascii_share/mean"] == pytest.approx(
        metrics["reward"])
    loss = grpo_loss(model, beta=0.1, epsilon=0.2, epsilon_high=0.2, loss_type="grpo",
                     temperature=1.0, max_new_tokens=8)
    for b in batches:
        value, m = jax.jit(loss)(params, b)
        assert float(m["clip_ratio"]) == 0.0
        assert float(m["kl"]) == pytest.approx(0.0, abs=1e-5)
        assert float(value) == pytest.approx(-b["advantages"].mean(), abs=1e-4)
    both = np.concatenate([b["advantages"] for b in batches])
    assert abs(both.mean()) < 1e-5 and both.std() > 0.1  # group-centred, not all zero
    # the next rollout (other prompts, key, rewards) and its updates compile nothing
    from test_infer_generate import compiles
    step = jax.jit(loss)
    step(params, batches[0])
    with compiles() as names:
        again, _ = make(PolicyView(params, params, None, 1, jax.random.key(4)),
                        prompt_data.load_prompts("tasks/add", tok, split="validation", limit=4))
        step(params, again[1])
    assert names == []


def _update_batch(config, model, params):
    from fmzoo.train import prompt_data
    from fmzoo.train.grpo import GRPOSection, make_grpo_rollout
    from fmzoo.train.onpolicy import PolicyView
    from fmzoo.train.rewards import load_rewards
    tok = ByteTokenizer()
    s = GRPOSection(num_generations=4, max_new_tokens=8, beta=0.1)

    def reward(prompts, completions, **kw):  # a spread of rewards: every row counts
        return [float(len(c) % 5) for c in completions]
    make = make_grpo_rollout(model, tok, load_rewards([reward]), s, batch_size=16,
                             max_length=40)
    moved = jax.tree.map(lambda x: x * 0.9, params)  # the reference differs from the policy
    (batch,), _ = make(PolicyView(params, moved, None, 0, jax.random.key(1)),
                       prompt_data.load_prompts("tasks/add", tok, limit=4))
    return batch


def _clipping_batch():
    from fmzoo.models.registry import init
    config = get_config("llama-tiny", **TINY_LM)
    model, params = build(config), init(config, 0)
    batch = _update_batch(config, model, params)
    batch["old_logps"] = batch["old_logps"] + 0.1 * np.random.RandomState(0).randn(
        *batch["old_logps"].shape).astype(np.float32) * (batch["old_logps"] != 0)  # clips
    return config, model, params, batch


def _loss(model, loss_type):
    from fmzoo.train.grpo import grpo_loss
    return grpo_loss(model, beta=0.1, epsilon=0.05, epsilon_high=0.05, loss_type=loss_type,
                     temperature=1.0, max_new_tokens=8)


def test_loss_types_weigh_microbatches_like_one_batch():
    """dr_grpo averages rows, dapo tokens: 4 microbatches give one batch's gradient."""
    from fmzoo.train.step import accumulate_gradients
    _, model, params, batch = _clipping_batch()
    for loss_type in ("dapo", "dr_grpo"):
        loss = _loss(model, loss_type)
        run = jax.jit(lambda p, b, k: accumulate_gradients(loss, p, b, jax.random.key(0), k),
                      static_argnums=2)
        (g1, m1), (g4, m4) = run(params, batch, 1), run(params, batch, 4)
        assert m1["tokens"] == (batch["response_mask"][:, 1:].sum() if loss_type == "dapo"
                                else 16)
        for k in m1:
            assert float(m4[k]) == pytest.approx(float(m1[k]), rel=2e-4, abs=1e-6), (loss_type, k)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g1, g4)


def test_update_step_sharded_equals_one_device_and_pmap():
    """The same GRPO update on one device, on a data x fsdp x tensor mesh and under pmap:
    equal metrics and params."""
    import optax

    from fmzoo.train.mesh import make_mesh, put_batch
    from fmzoo.train.state import init_train_state, sharded_init
    from fmzoo.train.step import make_pmap_step, make_train_step, replicate, shard_batch
    config, model, params, batch = _clipping_batch()
    loss, tx, out = _loss(model, "grpo"), optax.sgd(1.0), {}
    for spec in ("data=1", "data=2,fsdp=2,tensor=2"):
        n = int(np.prod([int(x.split("=")[1]) for x in spec.split(",")]))
        mesh = make_mesh(spec, jax.devices()[:n])
        _, sh = sharded_init(config, tx, mesh)
        state = jax.jit(lambda p: init_train_state(config, tx).replace(
            params=p, opt_state=tx.init(p)), out_shardings=sh)(params)
        state, m = make_train_step(loss, tx, mesh, sh)(state, put_batch(batch, mesh))
        out[spec] = ({k: float(v) for k, v in m.items()},
                     jax.tree.map(np.asarray, jax.device_get(state.params)))
    state = replicate(init_train_state(config, tx).replace(params=params,
                                                           opt_state=tx.init(params)))
    state, m = make_pmap_step(loss, tx)(state, shard_batch(batch, 8))
    out["pmap"] = ({k: float(v[0]) for k, v in m.items()},
                   jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(state.params)))
    want_m, want_p = out["data=1"]
    assert want_m["clip_ratio"] > 0 and want_m["kl"] > 0
    for name, (m, p) in out.items():
        for k in want_m:
            assert m[k] == pytest.approx(want_m[k], rel=2e-4, abs=1e-6), (name, k)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), want_p, p)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_a_toy_reward(tmp_path, toy_reward, advantage):
    from fmzoo.train.grpo import grpo
    grpo(_settings(tmp_path, grpo={"reward": f"{toy_reward}:ascii_share",
                                   "advantage": advantage, "num_generations": 4},
                   data={"batch_size": 32}, run={"steps": 12}, checkpoint={"save_every": 12},
                   optim={"lr": 3e-2}))
    rows = _train_rows(tmp_path)
    first = np.mean([rows[s]["reward"] for s in (1, 2, 3)])
    last = np.mean([rows[s]["reward"] for s in (10, 11, 12)])
    assert last > first + 0.2, (first, last)
    assert rows[12]["entropy"] < rows[1]["entropy"] - 0.3


def test_resume_continues_the_same_run(tmp_path, toy_reward):
    """Stopped at step 2 and resumed: the same prompts, samples and updates as one run."""
    from fmzoo.train.grpo import grpo
    kw = dict(grpo={"reward": f"{toy_reward}:ascii_share", "beta": 0.05,
                    "num_iterations": 2})
    grpo(_settings(tmp_path / "one", **kw))
    grpo(_settings(tmp_path / "two", **kw), stop_after=2)
    grpo(_settings(tmp_path / "two", run={"resume": True}, **kw))
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert one[2]["clip_ratio"] >= 0 and one[1]["kl"] == pytest.approx(0, abs=1e-6)
    for step in one:
        for k, v in one[step].items():
            assert two[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)


def test_bad_input_is_refused_before_work(tmp_path, toy_reward):
    from fmzoo.models.config import ConfigError
    from fmzoo.train.grpo import grpo, prepare_grpo
    from fmzoo.train.rewards import RewardError
    with pytest.raises(ConfigError, match="--num-generations 1: GRPO and RLOO compare"):
        _settings(tmp_path, grpo={"num_generations": 1})
    with pytest.raises(ConfigError, match="not a multiple of --num-generations 3"):
        prepare_grpo(_settings(tmp_path, grpo={"num_generations": 3}))
    with pytest.raises(ConfigError, match="--save-every 3 is not a multiple of the 2 updates"):
        prepare_grpo(_settings(tmp_path, grpo={"num_iterations": 2},
                               checkpoint={"save_every": 3}))
    with pytest.raises(ConfigError, match="'nonsense' is not a known reward"):
        prepare_grpo(_settings(tmp_path, grpo={"reward": "nonsense"}))
    with pytest.raises(ConfigError, match="leaves no room for the prompt"):
        prepare_grpo(_settings(tmp_path, grpo={"max_new_tokens": 40}))
    with pytest.raises(ConfigError, match="shortest has"):
        prepare_grpo(_settings(tmp_path, grpo={"max_new_tokens": 30}))
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(RewardError, match="returned 1 rewards for 16 completions"):
        grpo(_settings(tmp_path, grpo={"reward": f"{toy_reward}:wrong_length"}))


def test_lora_with_reference_on_a_mesh_and_under_pmap(tmp_path, toy_reward):
    """LoRA: the frozen base is the reference (KL 0 on the first rollout, where B = 0), and
    the first rollout and update on a data x tensor mesh equal pmap's (later rollouts may
    sample differently once float rounding has parted the params)."""
    from fmzoo.api import load
    from fmzoo.train.grpo import grpo
    kw = dict(grpo={"reward": f"{toy_reward}:ascii_share", "beta": 0.1, "lora_rank": 2},
              optim={"lr": 3e-2}, run={"steps": 2})
    grpo(_settings(tmp_path / "mesh", mesh={"spec": "data=4,tensor=2"}, **kw))
    grpo(_settings(tmp_path / "pmap", mesh={"pmap": True}, **kw))
    mesh, pmap = _train_rows(tmp_path / "mesh"), _train_rows(tmp_path / "pmap")
    assert mesh[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert mesh[2]["kl"] > 1e-6 and pmap[2]["kl"] > 1e-6
    for k, v in mesh[1].items():
        assert pmap[1][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    merged = load(str(tmp_path / "mesh")).params
    base = load("llama-tiny", **TINY_LM).params  # same seed: the starting point
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), merged, base)
    assert max(jax.tree.leaves(moved)) > 1e-4
