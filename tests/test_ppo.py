"""PPO (RLHF): the actor-critic model family (policy + value model in one param tree) and
`fmzoo ppo` on the Trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models import registry
from fmzoo.models.actor_critic import ActorCritic
from fmzoo.models.config import (ActorCriticConfig, ConfigError, config_from_dict,
                                 config_from_json)
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.models.workdir import CheckpointError, load_workdir

from train_helpers import tiny_config

POLICY = tiny_config("llama")
VALUE = tiny_config("gpt").replace(head="score")  # another flavour: the two are independent
PAIR = ActorCriticConfig(policy=POLICY, value=VALUE)


# ------------------------------------------------------------------ the model family


def test_config_round_trips_and_is_hashable():
    assert config_from_dict(PAIR.to_dict()) == PAIR
    assert config_from_json(PAIR.to_json()) == PAIR
    assert hash(config_from_json(PAIR.to_json())) == hash(PAIR)
    assert PAIR.to_dict()["family"] == "actor_critic" and PAIR.vocab_size == POLICY.vocab_size
    assert PAIR.eos_id == POLICY.eos_id and PAIR.max_len == min(POLICY.max_len, VALUE.max_len)
    with pytest.raises(ConfigError, match=r"no field\(s\) \['dtype'\]"):
        PAIR.replace(dtype="bfloat16")


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="value must have a score head"):
        ActorCriticConfig(policy=POLICY, value=POLICY)
    with pytest.raises(ConfigError, match="policy must be a language model"):
        ActorCriticConfig(policy=VALUE, value=VALUE)
    with pytest.raises(ConfigError, match=r"vocabulary \(300\) differs from the policy's "
                                          r"\(264\)"):
        ActorCriticConfig(policy=POLICY, value=VALUE.replace(vocab_size=300))
    with pytest.raises(ConfigError, match="must be a decoder-only LMConfig"):
        ActorCriticConfig(policy=tiny_config("encdec"), value=VALUE)


def test_param_tree_is_the_two_models_own():
    shapes = registry.param_shapes(PAIR)
    assert set(shapes) == {"policy", "value"}
    for part, config in (("policy", POLICY), ("value", VALUE)):
        own = registry.param_shapes(config)
        assert jax.tree.structure(shapes[part]) == jax.tree.structure(own)
        assert jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype,
                            shapes[part], own) == jax.tree.map(lambda _: True, own)
    axes = registry.logical_axes(PAIR)  # logical axes flow through: sharding works as is
    assert axes["policy"] == registry.logical_axes(POLICY)
    assert axes["value"] == registry.logical_axes(VALUE)


def test_values_at_every_position_and_policy_logits():
    params = registry.init(PAIR, 0)
    model = registry.build(PAIR)
    assert isinstance(model, ActorCritic)
    value_lm = registry.build(VALUE)
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, 256, (3, 9)).astype(np.int32)
    mask = (np.arange(9)[None] < np.array([[9], [6], [4]])).astype(np.int32)

    @jax.jit
    def forwards(params, prefixes, prefix_mask):
        return (model.apply({"params": params}, tokens),
                registry.build(POLICY).apply({"params": params["policy"]}, tokens),
                model.apply({"params": params}, tokens, mask, method=model.values),
                model.apply({"params": params}, tokens, mask, method=model.logits_and_values),
                value_lm.apply({"params": params["value"]}, prefixes, prefix_mask,
                               method=value_lm.score))
    # each prefix tokens[b, :t + 1] scored alone (the reward model's last-token read) ==
    # the value at position t
    where = [(b, t) for b, n in enumerate((9, 6, 4)) for t in range(n)]
    prefixes = np.zeros((len(where), 9), np.int32)
    prefix_mask = np.zeros((len(where), 9), np.int32)
    for i, (b, t) in enumerate(where):
        prefixes[i, :t + 1], prefix_mask[i, :t + 1] = tokens[b, :t + 1], 1
    logits, want, values, both, scores = jax.device_get(forwards(params, prefixes,
                                                                 prefix_mask))
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)  # the policy's logits
    assert values.shape == (3, 9) and values.dtype == np.float32
    np.testing.assert_allclose(scores, [values[b, t] for b, t in where], rtol=1e-5, atol=1e-5)
    real = mask > 0  # right padding: causal attention leaves real positions unchanged
    np.testing.assert_allclose(both[0][real], logits[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], values, rtol=1e-6, atol=1e-6)


def _ppo_workdir(root):
    from fmzoo.train.checkpoint import Checkpointer, write_run_file
    from fmzoo.train.mesh import make_mesh
    from fmzoo.train.optim import make_optimizer
    from fmzoo.train.state import sharded_init
    work = root / "ppo"
    work.mkdir()
    state, _ = sharded_init(PAIR, make_optimizer(1e-3, 10), make_mesh("data=8"), 0)
    write_run_file(str(work), PAIR, {})
    ByteTokenizer().save(str(work / "tokenizer"))
    ckpt = Checkpointer(str(work), async_save=False)
    ckpt.save(state.replace(step=np.asarray(2, state.step.dtype)), {})
    ckpt.close()
    return work, jax.device_get(state.params)


def test_load_of_a_ppo_workdir_gives_the_policy(tmp_path):
    import fmzoo
    work, params = _ppo_workdir(tmp_path)
    loaded = fmzoo.load(str(work))
    assert loaded.config == POLICY and loaded.tokenizer.decode([104, 105]) == "hi"
    assert jax.tree.structure(loaded.params) == jax.tree.structure(params["policy"])
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params["policy"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    value = load_workdir(str(work), part="value", dtype="bfloat16")
    assert value.config == VALUE.replace(dtype="bfloat16", param_dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(value.params["score_head"]["kernel"]),
        np.asarray(params["value"]["score_head"]["kernel"]).astype(jnp.bfloat16))
    from fmzoo.infer import generate  # the policy generates like any LM
    out = generate(loaded.model, loaded.params, [[POLICY.bos_id, 104]], max_new_tokens=3)
    assert len(out[0]) <= 3
    assert fmzoo.load(str(work), attention_impl="reference").config == \
        POLICY.replace(attention_impl="reference")  # the policy's fields are the overrides
    with pytest.raises(CheckpointError, match="holds 'policy' and 'value'"):
        load_workdir(str(work), part="critic")


# ------------------------------------------------------------------ fmzoo ppo

TINY_LM = dict(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_len=64)


def _settings(workdir, **sections):
    from fmzoo.train.ppo import PPOSettings
    d = {"model": {"source": "llama-tiny", "overrides": TINY_LM},
         "data": {"name": "tasks/add", "batch_size": 16, "max_length": 40},
         "eval": {"every": 0, "examples": 0, "at_start": False},
         "ppo": {"max_new_tokens": 8, "num_ppo_epochs": 2, "num_mini_batches": 2},
         "optim": {"lr": 3e-3, "warmup": 0},
         "run": {"workdir": str(workdir), "steps": 4, "progress": False, "log_every": 1},
         "checkpoint": {"save_every": 4, "async_save": False}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return PPOSettings.from_dict(d)


@pytest.fixture(scope="module")
def fresh_rollout():
    """A tiny actor-critic (the value model: the policy with a zero score head, as
    --value-model policy starts it), its first rollout's update batches and metrics."""
    from fmzoo.models import get_config
    from fmzoo.train import prompt_data
    from fmzoo.train.onpolicy import PolicyView
    from fmzoo.train.ppo import PPOSection, make_ppo_rollout
    from fmzoo.train.rewards import load_rewards
    policy = get_config("llama-tiny", **TINY_LM)
    pair = ActorCriticConfig(policy, policy.replace(head="score"))
    params = jax.device_get(registry.init(pair, 0))
    model, tok = registry.build(pair), ByteTokenizer()
    s = PPOSection(max_new_tokens=8, num_ppo_epochs=2, num_mini_batches=2, kl_estimator="k3",
                   kl_coef=0.1)

    def length_reward(prompts, completions, **_):  # any reward: the first update ignores it
        return [len(c) / 8.0 for c in completions]
    make = make_ppo_rollout(model, tok, load_rewards(length_reward), s, batch_size=4,
                            max_length=40)
    prompts = prompt_data.load_prompts("tasks/add", tok, limit=8)
    batches, metrics = make(PolicyView(params, params, None, 0, jax.random.key(3)), prompts)
    return model, params, s, batches, metrics


def test_first_update_of_a_fresh_rollout_has_ratio_one(fresh_rollout):
    """On the rollout's own policy and value model: ratio 1 (approxkl 0, nothing clipped),
    KL 0 to a reference equal to the policy, the value loss that of the old values."""
    from fmzoo.train.ppo import ppo_step_loss
    from fmzoo.train.rl_losses import action_mask
    model, params, s, batches, metrics = fresh_rollout
    assert len(batches) == 4 and all(b["tokens"].shape == (4, 40) for b in batches)
    assert {"old_values", "advantages", "returns", "ref_logps"} <= set(batches[0])
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["objective/non_score_reward"] == 0.0  # k3: the KL is a loss term
    assert metrics["objective/scores"] == pytest.approx(metrics["objective/rlhf_reward"])
    # the two epochs visit the same 8 rows, each in its own order
    rows = [sorted(map(bytes, np.concatenate([b["tokens"] for b in batches[e:e + 2]])))
            for e in (0, 2)]
    assert rows[0] == rows[1]
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in
                   zip(batches[:2], batches[2:]))
    loss = jax.jit(ppo_step_loss(model, s))
    for b in batches:
        value, m = loss(params, b)
        mask = np.asarray(action_mask(b["response_mask"]))
        assert float(m["policy/approxkl_avg"]) == pytest.approx(0.0, abs=1e-9)
        assert float(m["policy/clipfrac_avg"]) == 0.0 and float(m["val/clipfrac_avg"]) == 0.0
        assert float(m["kl"]) == pytest.approx(0.0, abs=1e-5)
        assert float(m["tokens"]) == mask.sum()
        pg = -(b["advantages"] * mask).sum() / mask.sum()  # ratio 1: -mean advantage
        vf = 0.5 * (((b["old_values"] - b["returns"]) ** 2) * mask).sum() / mask.sum()
        assert float(m["loss/policy_avg"]) == pytest.approx(pg, abs=1e-5)
        assert float(m["loss/value_avg"]) == pytest.approx(vf, rel=1e-5, abs=1e-6)
        assert float(value) == pytest.approx(pg + s.vf_coef * vf, abs=1e-5)
    all_adv = np.concatenate([b["advantages"][np.asarray(action_mask(b["response_mask"])) > 0]
                              for b in batches[:2]])
    assert abs(all_adv.mean()) < 1e-5 and all_adv.std() == pytest.approx(1.0, abs=0.1)


def test_ppo_step_sharded_equals_one_device(fresh_rollout):
    """One optimizer step of the PPO loss on the same minibatch: data x fsdp x tensor over
    8 devices == one device (loss, metrics and the updated params, hence the gradients)."""
    from fmzoo.train.mesh import make_mesh, put_batch
    import optax

    from fmzoo.train.ppo import ppo_step_loss
    from fmzoo.train.state import state_shardings, create_train_state
    from fmzoo.train.step import make_train_step
    model, params, s, batches, _ = fresh_rollout
    pair = model.config
    tx = optax.sgd(1.0)  # the update IS the gradient (Adam's first step is its sign)
    results = []
    for spec, devices in (("data=1", jax.devices()[:1]), ("data=2,fsdp=2,tensor=2", None)):
        mesh = make_mesh(spec, devices)
        state = create_train_state(params, tx, 0)
        shardings = state_shardings(pair, jax.eval_shape(lambda: state), mesh, tx)
        state = jax.device_put(state, shardings)
        step = make_train_step(ppo_step_loss(model, s), tx, mesh, shardings)
        state, m = step(state, put_batch(batches[1], mesh))
        results.append((jax.device_get(m), jax.device_get(state.params)))
    (m1, p1), (m8, p8) = results
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _train_rows(workdir):
    import json
    with open(f"{workdir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "loss" in r}


def test_ppo_raises_a_toy_reward_and_loads_as_its_policy(tmp_path, toy_reward):
    """24 rollouts of 32 prompts, one update each. lam=1: with a value model that starts at
    0, GAE's lambda-discount would make early tokens' advantages differ from late ones by
    more than the rows' rewards do (the whitened signal is then mostly position)."""
    import fmzoo
    from fmzoo.train.ppo import ppo
    work = tmp_path / "run"
    summary = ppo(_settings(work, ppo={"reward": f"{toy_reward}:ascii_share",
                                       "num_ppo_epochs": 1, "num_mini_batches": 1, "lam": 1.0},
                            data={"batch_size": 32}, optim={"lr": 1e-2},
                            eval={"examples": 8}, run={"steps": 24},
                            checkpoint={"save_every": 24}))
    # the final evaluation answers held-out prompts greedily with the policy
    assert 0 <= summary["eval_exact_match"] <= 1 and 0 <= summary["eval_reward"] <= 1
    rows = _train_rows(work)
    first = np.mean([rows[s]["objective/scores"] for s in (1, 2, 3)])
    last = np.mean([rows[s]["objective/scores"] for s in (22, 23, 24)])
    assert last > first + 0.1, (first, last)
    for name in ("objective/kl", "objective/entropy", "objective/non_score_reward",
                 "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg",
                 "policy/entropy_avg"):
        assert np.isfinite(rows[24][name]), name
    assert rows[24]["objective/kl"] > 0  # the policy moved away from the reference
    loaded = fmzoo.load(str(work))
    assert loaded.config.head == "lm" and loaded.config.n_layers == 1
    assert load_workdir(str(work), part="value").config.head == "score"


def _reward_model_workdir(root, vocab_size):
    """A reward-model workdir as `fmzoo reward` writes it (fresh weights)."""
    from fmzoo.train.checkpoint import Checkpointer, write_run_file
    from fmzoo.train.mesh import make_mesh
    from fmzoo.train.optim import make_optimizer
    from fmzoo.train.state import sharded_init
    config = registry.get_config("llama-tiny", **TINY_LM).replace(head="score",
                                                                 vocab_size=vocab_size)
    work = root / f"rm{vocab_size}"
    work.mkdir()
    state, _ = sharded_init(config, make_optimizer(1e-3, 10), make_mesh("data=8"), 0)
    write_run_file(str(work), config, {})
    ByteTokenizer().save(str(work / "tokenizer"))
    ckpt = Checkpointer(str(work), async_save=False)
    ckpt.save(state, {})
    ckpt.close()
    return str(work)


def test_value_model_starts_from_the_reward_model(tmp_path):
    from fmzoo.train.ppo import prepare_ppo
    rm = _reward_model_workdir(tmp_path, 264)
    trainer = prepare_ppo(_settings(tmp_path / "run", ppo={"reward": rm}))
    assert trainer.config.value == load_workdir(rm).config
    want = load_workdir(rm).params
    got = trainer.init_params["value"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    policy_start = prepare_ppo(_settings(tmp_path / "run", ppo={"reward": rm,
                                                                "value_model": "policy"}))
    value = policy_start.init_params["value"]
    assert not np.asarray(value["score_head"]["kernel"]).any()  # values start at 0
    np.testing.assert_array_equal(np.asarray(value["embed"]["embedding"]),
                                  np.asarray(policy_start.init_params["policy"]["embed"]
                                             ["embedding"]))


def test_bad_input_is_refused_before_work(tmp_path, toy_reward):
    from fmzoo.train.ppo import prepare_ppo
    work = tmp_path / "run"
    with pytest.raises(ConfigError, match="--rollout-batch 24 does not split into "
                                          "--num-mini-batches 2 update batches of "
                                          "--batch-size 16; pass --rollout-batch 32"):
        prepare_ppo(_settings(work, ppo={"rollout_batch": 24}))
    with pytest.raises(ConfigError, match="--rollout-batch 30 does not split"):
        prepare_ppo(_settings(work, ppo={"rollout_batch": 30, "num_mini_batches": 4},
                              data={"batch_size": 8}))
    with pytest.raises(ConfigError, match="--save-every 6 is not a multiple of the 4 updates"):
        prepare_ppo(_settings(work, checkpoint={"save_every": 6}))
    with pytest.raises(ConfigError, match="--lora-rank 4: fmzoo ppo trains the policy and "
                                          "the value model in full"):
        _settings(work, ppo={"lora_rank": 4})
    with pytest.raises(ConfigError, match="--value-model reward starts the value model from "
                                          "a reward model, but --reward"):
        prepare_ppo(_settings(work, ppo={"reward": f"{toy_reward}:ascii_share",
                                         "value_model": "reward"}))
    with pytest.raises(ConfigError, match="'nonsense' is not a known reward"):
        prepare_ppo(_settings(work, ppo={"reward": "nonsense"}))
    with pytest.raises(ConfigError, match="leaves no room for the prompt"):
        prepare_ppo(_settings(work, ppo={"max_new_tokens": 40}))
    with pytest.raises(ConfigError, match="--max-length 80 is longer than the model's "
                                          "max_len=64"):
        prepare_ppo(_settings(work, data={"max_length": 80}))
    rm = _reward_model_workdir(tmp_path, 300)
    with pytest.raises(ConfigError, match=r"--value-model reward \(.*rm300\): the value "
                                          r"model's vocabulary \(300\) differs from the "
                                          r"policy's \(264\)"):
        prepare_ppo(_settings(work, ppo={"reward": rm}))
    assert not work.exists()


def test_resume_continues_the_same_run_against_a_reward_model(tmp_path):
    """`fmzoo ppo --reward RM_DIR` (the value model starts from the reward model), stopped
    after the first rollout and resumed: the same prompts, samples and updates (policy,
    value model and optimizer state all restored) as one uninterrupted run."""
    from fmzoo.train.ppo import ppo
    rm = _reward_model_workdir(tmp_path, 264)
    kw = dict(ppo={"reward": rm, "num_ppo_epochs": 1, "num_mini_batches": 1},
              data={"batch_size": 8}, run={"steps": 2}, checkpoint={"save_every": 1})
    ppo(_settings(tmp_path / "one", **kw))
    ppo(_settings(tmp_path / "two", **kw), stop_after=1)
    ppo(_settings(tmp_path / "two", **{**kw, "run": {"steps": 2, "resume": True}}))
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    assert one[2]["objective/kl"] != 0  # the second rollout comes from an updated policy
    assert f"rewards/{rm}/mean" in one[1]  # the reward model scored the rollouts
    for step in one:
        for k, v in one[step].items():
            if k not in ("tokens_per_s", "timing/rollout_s", "rollout_tokens_per_s"):
                assert two[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)


def test_cli_registers_ppo_and_reports_bad_flags(tmp_path, capsys):
    from fmzoo.cli import main
    code = main(["ppo", "--model", "llama-tiny", "--workdir", str(tmp_path / "w"),
                 "--batch-size", "8", "--num-mini-batches", "2", "--rollout-batch", "12"])
    assert code == 2
    assert "error: --rollout-batch 12 does not split into --num-mini-batches 2 update " \
           "batches of --batch-size 8; pass --rollout-batch 16" in capsys.readouterr().err


def test_rewards_are_kl_penalty_plus_score_and_whitened_on_request(fresh_rollout):
    """With gamma = lam = 1 the returns are the rewards-to-go, so each token's reward is
    returns[t] - returns[t + 1]: k1 with a reference equal to the policy leaves the score
    alone at the last token; --whiten-rewards gives them unit variance (TRL: mean kept)."""
    from fmzoo.train import prompt_data
    from fmzoo.train.onpolicy import PolicyView
    from fmzoo.train.ppo import PPOSection, make_ppo_rollout
    from fmzoo.train.rewards import load_rewards
    from fmzoo.train.rl_losses import action_mask
    model, params, _, _, _ = fresh_rollout
    tok = ByteTokenizer()
    prompts = prompt_data.load_prompts("tasks/add", tok, limit=8)

    def length_reward(prompts, completions, **_):
        return [len(c) / 8.0 for c in completions]
    out = {}
    for whiten in (False, True):
        s = PPOSection(max_new_tokens=8, num_ppo_epochs=1, gamma=1.0, lam=1.0,
                       whiten_rewards=whiten)
        make = make_ppo_rollout(model, tok, load_rewards(length_reward), s, batch_size=8,
                                max_length=40)
        (b,), m = make(PolicyView(params, params, None, 0, jax.random.key(3)), prompts)
        mask = np.asarray(action_mask(b["response_mask"]))
        returns = b["returns"]
        rewards = (returns - np.concatenate([returns[:, 1:], returns[:, :1] * 0], 1)) * mask
        out[whiten] = rewards, mask, m
    rewards, mask, m = out[False]
    last = mask * (np.cumsum(mask[:, ::-1], 1)[:, ::-1] == 1)  # each row's last token
    np.testing.assert_allclose(rewards.sum(1), (rewards * last).sum(1), atol=1e-5)
    assert np.mean((rewards * last).sum(1)) == pytest.approx(m["objective/scores"], abs=1e-5)
    white, mask, _ = out[True]
    n = mask.sum()
    mean = white[mask > 0].mean()
    assert ((white - mean) ** 2 * mask).sum() / (n - 1) == pytest.approx(1.0, abs=1e-3)
    assert mean == pytest.approx(rewards[mask > 0].mean(), abs=1e-5)  # shift_mean=False
