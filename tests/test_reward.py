"""The reward model (issue 11): the score head, the Bradley-Terry loss against its formula,
margin and centering, padding invariance, microbatches == devices == pmap, learning an easy
preference, `fmzoo reward` -> fmzoo.load -> score, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmzoo.models.config import ConfigError
from fmzoo.models.registry import build, init, param_shapes
from fmzoo.train.mesh import make_mesh, put_batch
from fmzoo.train.optim import make_optimizer
from fmzoo.train.reward import (RewardSection, bt_loss, pair_rewards, reward_loss,
                                std_from_squares, with_score_head)
from fmzoo.train.state import create_train_state, sharded_init
from fmzoo.train.step import make_pmap_step, make_train_step, replicate, shard_batch
from train_helpers import local_numpy, tiny_config

PAD = 256


def fast_init(config, seed=0):
    """init compiled as one program (eager init compiles every op on its own: slow)."""
    return jax.jit(init, static_argnums=(0, 1))(config, seed)


def rm_config(family="gpt"):
    return tiny_config(family).replace(head="score")


def pair_batch(pairs, T=16, side="right", margins=None):
    """Contract-format batch from [(chosen_ids, rejected_ids)], padded on `side`."""
    B = len(pairs)
    tokens = np.full((B, 2, T), PAD, np.int32)
    mask = np.zeros((B, 2, T), np.int32)
    for i, pair in enumerate(pairs):
        for j, ids in enumerate(pair):
            sl = slice(0, len(ids)) if side == "right" else slice(T - len(ids), T)
            tokens[i, j, sl], mask[i, j, sl] = ids, 1
    margin = np.zeros(B, np.float32) if margins is None else np.asarray(margins, np.float32)
    return dict(tokens=tokens, mask=mask, response_mask=mask.astype(np.float32),
                margin=margin, index=np.arange(B, dtype=np.int32))


def random_pairs(rs, B=16, low=4, high=13):
    def seq():
        return [257] + list(rs.randint(0, 256, rs.randint(low, high))) + [258]
    return [(seq(), seq()) for _ in range(B)]


def test_score_head_config_and_params():
    lm = tiny_config("llama")
    with pytest.raises(ConfigError, match="head must be one of"):
        lm.replace(head="value")
    c = lm.replace(head="score")
    shapes = param_shapes(c)
    assert "lm_head" not in shapes and shapes["score_head"]["kernel"].shape == (32, 1)
    lm_params = param_shapes(lm)
    converted = with_score_head(lm_params, c, 1)  # an LM's trunk + a fresh head
    assert jax.tree.map(lambda x: x.shape, converted) == jax.tree.map(lambda x: x.shape, shapes)
    assert converted["embed"] is lm_params["embed"]
    # a score model cannot generate; an LM cannot score (both refused while tracing)
    model, lm_model = build(c), build(lm)
    with pytest.raises(ValueError, match="reward model .*cannot generate"):
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1,), jnp.int32),
                                             model.init_cache(1, 8), method=model.decode_step),
                       shapes)
    with pytest.raises(ValueError, match="needs a reward model"):
        jax.eval_shape(lambda p: lm_model.apply({"params": p}, jnp.zeros((1, 4), jnp.int32),
                                                jnp.ones((1, 4), jnp.int32),
                                                method=lm_model.score), lm_params)


def test_loss_matches_the_formula_by_hand():
    rs = np.random.RandomState(0)
    rc, rr, m = rs.randn(8), rs.randn(8), rs.rand(8)
    sig = 1 / (1 + np.exp(-(rc - rr - m)))
    np.testing.assert_allclose(bt_loss(rc, rr, m), -np.log(sig), rtol=1e-5)
    np.testing.assert_allclose(bt_loss(rc, rr, m, center_rewards_coefficient=0.1),
                               -np.log(sig) + 0.1 * (rc + rr) ** 2, rtol=1e-5)
    # the Trainer loss: one forward for chosen and rejected, the same numbers by hand
    c = rm_config()
    model, params = build(c), fast_init(c)
    pairs = random_pairs(rs)
    b = pair_batch(pairs, margins=rs.rand(16))
    # each side on its own: [B, T] rows, positions 0.. on the real tokens
    side = jax.jit(lambda t, m: model.apply({"params": params}, t, m, method=model.score))
    r_c = np.asarray(side(b["tokens"][:, 0], b["mask"][:, 0]))
    r_r = np.asarray(side(b["tokens"][:, 1], b["mask"][:, 1]))
    loss, mets = jax.jit(reward_loss(model, c, center_rewards_coefficient=0.05))(params, b)
    sig = 1 / (1 + np.exp(-(r_c - r_r - b["margin"])))
    want = np.mean(-np.log(sig) + 0.05 * (r_c + r_r) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(mets["accuracy"]), np.mean(r_c > r_r))
    np.testing.assert_allclose(float(mets["margin"]), np.mean(r_c - r_r), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(mets["rewards/chosen"]), r_c.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(mets["rewards/rejected"]), r_r.mean(), rtol=1e-4,
                               atol=1e-6)
    assert float(mets["tokens"]) == 16 and float(mets["num_tokens"]) == b["mask"].sum()
    row = {k: float(v) for k, v in mets.items()}
    std = std_from_squares(row)
    np.testing.assert_allclose(std["rewards/chosen_std"], r_c.std(), rtol=1e-3)
    np.testing.assert_allclose(std["rewards/rejected_std"], r_r.std(), rtol=1e-3)
    assert "rewards/chosen_sq" not in row


def test_margin_and_centering_terms():
    c = rm_config()
    model, params = build(c), fast_init(c)
    b = pair_batch(random_pairs(np.random.RandomState(1)))
    rc, rr = jax.jit(lambda b: pair_rewards(model, params, b))(b)
    plain = jax.jit(reward_loss(model, c))
    base = float(plain(params, b)[0])
    shifted = float(plain(params, dict(b, margin=b["margin"] + 1.0))[0])
    # a margin asks for a larger gap: the same rewards cost more, by the formula
    np.testing.assert_allclose(shifted, float(jnp.mean(-jax.nn.log_sigmoid(rc - rr - 1.0))),
                               rtol=1e-5)
    assert shifted > base
    centred = float(jax.jit(reward_loss(model, c, center_rewards_coefficient=0.5))(params, b)[0])
    np.testing.assert_allclose(centred - base, 0.5 * float(jnp.mean((rc + rr) ** 2)),
                               rtol=1e-4)
    with pytest.raises(ValueError, match="center_rewards_coefficient must be"):
        reward_loss(model, c, center_rewards_coefficient=-0.1)
    with pytest.raises(ConfigError, match=r"--center-rewards-coefficient .*must be >= 0"):
        RewardSection(center_rewards_coefficient=-1.0)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_padding_amount_and_side_change_nothing(family):
    c = rm_config(family)
    model, params = build(c), fast_init(c)
    pairs = random_pairs(np.random.RandomState(2), B=4)
    rewards = jax.jit(lambda b: jnp.stack(pair_rewards(model, params, b)))
    ref = np.asarray(rewards(pair_batch(pairs, T=16)))
    for T, side in ((16, "left"), (24, "right"), (24, "left")):
        got = np.asarray(rewards(pair_batch(pairs, T=T, side=side)))
        np.testing.assert_allclose(got, ref, atol=2e-5)


def _one_step_rows(c, batch, *, mesh_spec=None, devices=None, accum=1, pmap=False):
    loss = reward_loss(build(c), c, center_rewards_coefficient=0.01)
    tx = make_optimizer(1e-2, 10, warmup_steps=1)
    if pmap:
        state = replicate(create_train_state(fast_init(c), tx))
        state, m = make_pmap_step(loss, tx, accum_steps=accum)(
            state, shard_batch(batch, jax.local_device_count()))
        return {k: float(np.asarray(v)[0]) for k, v in m.items()}, local_numpy(
            jax.tree.map(lambda x: x[0], state.params))
    mesh = make_mesh(mesh_spec, devices)
    state, shardings = sharded_init(c, tx, mesh)
    state, m = make_train_step(loss, tx, mesh, shardings, accum_steps=accum)(
        state, put_batch(batch, mesh))
    return {k: float(v) for k, v in m.items()}, local_numpy(state.params)


def test_microbatches_devices_and_pmap_agree():
    c = rm_config("llama")
    rs = np.random.RandomState(3)
    b = pair_batch(random_pairs(rs), side="left", margins=rs.rand(16))
    b["mask"][5] = 0  # a padding pair weighs nothing (and gives no NaN)
    single, p1 = _one_step_rows(c, b, mesh_spec="data=1", devices=jax.devices()[:1])
    # 2 microbatches per shard on 8 devices, and under pmap, against one batch on one device
    for kw in (dict(mesh_spec="data=2,fsdp=2,tensor=2", accum=2), dict(pmap=True, accum=2)):
        rows, p = _one_step_rows(c, b, **kw)
        assert rows["tokens"] == single["tokens"] == 15  # pairs, summed
        assert rows["num_tokens"] == single["num_tokens"] == b["mask"].sum()
        for k in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected_sq",
                  "grad_norm"):
            np.testing.assert_allclose(rows[k], single[k], rtol=2e-5, atol=1e-6, err_msg=k)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4),
                     p, p1)


def easy_pairs(rs, B):
    """Chosen responses are lower-case a..m, rejected n..z, after a random prompt."""
    def seq(lo, hi):
        prompt = list(rs.randint(48, 58, rs.randint(2, 5)))
        return [257] + prompt + list(rs.randint(lo, hi, rs.randint(3, 7))) + [258]
    return [(seq(97, 110), seq(110, 123)) for _ in range(B)]


def test_learns_an_easy_preference_to_090_held_out_accuracy():
    c = rm_config("gpt")
    model = build(c)
    loss = reward_loss(model, c)
    tx = optax.adamw(3e-3)
    state = create_train_state(fast_init(c), tx)

    @jax.jit
    def step(state, batch):
        (_, m), g = jax.value_and_grad(loss, has_aux=True)(state.params, batch, None)
        updates, opt = tx.update(g, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt), m
    rs = np.random.RandomState(4)
    held_out = pair_batch(easy_pairs(np.random.RandomState(99), 64))
    evaluate = jax.jit(lambda p: reward_loss(model, c, deterministic=True)(p, held_out)[1])
    before = float(evaluate(state.params)["accuracy"])
    for _ in range(40):
        state, _ = step(state, pair_batch(easy_pairs(rs, 16)))
    after = evaluate(state.params)
    assert float(after["accuracy"]) >= 0.9 > before
    assert float(after["margin"]) > 0


def _write_prefs(d, n, seed):
    import json
    rs = np.random.RandomState(seed)
    with open(d, "w") as f:
        for i in range(n):
            a, b = rs.randint(10, 50, 2)
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}?"}],
                                "chosen": [{"role": "assistant", "content": str(a + b)}],
                                "rejected": [{"role": "assistant", "content": str(a + b + 1)}],
                                "margin": float(i % 3) / 2}) + "\n")


def test_cli_workdir_loads_and_scores_as_trained(tmp_path, capsys):
    import fmzoo
    from fmzoo.cli import main
    from fmzoo.train.pref_data import load_pref_source, pref_batches
    data = tmp_path / "prefs"
    data.mkdir()
    _write_prefs(data / "train.jsonl", 24, 0)
    _write_prefs(data / "valid.jsonl", 8, 1)
    work = tmp_path / "rm"
    code = main(["reward", "--model", "gpt-tiny", "n_layers=1", "d_model=32", "d_ff=64",
                 "max_len=32", "--data", str(data), "--data-dir", str(tmp_path / "tfds"),
                 "--batch-size", "8", "--max-length", "32", "--steps", "2", "--eval-every",
                 "0", "--no-eval-at-start", "--workdir", str(work), "--no-progress",
                 "--center-rewards-coefficient", "0.01"])
    assert code == 0, capsys.readouterr().err
    m = fmzoo.load(str(work))
    assert m.config.head == "score"
    # the saved params give the run's final held-out loss (margins and centering included)
    b = next(iter(pref_batches(str(data), m.tokenizer, batch_size=8, max_length=32,
                               split="validation", shuffle=False, num_epochs=1,
                               data_dir=str(tmp_path / "tfds"))))
    rc, rr = map(np.asarray, jax.jit(lambda p, b: pair_rewards(m.model, p, b))(m.params, b))
    loss = np.mean(-np.log(1 / (1 + np.exp(-(rc - rr - b["margin"])))) + 0.01 * (rc + rr) ** 2)
    import json
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loss, rows[-1]["eval_loss"], rtol=1e-5)
    assert b["margin"].any()  # the data's margins reached the loss
    # score() encodes (prompt, response) as training did: the batch's chosen-row rewards
    src = load_pref_source(str(data), "validation", data_dir=str(tmp_path / "tfds"))
    recs = [src.record(int(i)) for i in b["index"]]
    got = fmzoo.score(m.model, m.params, m.tokenizer, [r["prompt"] for r in recs],
                      [r["chosen"] for r in recs], batch_size=3)
    np.testing.assert_allclose(got, rc, atol=1e-5)
    with pytest.raises(ValueError, match="1 responses"):
        fmzoo.score(m.model, m.params, m.tokenizer, ["a", "b"], ["c"])


def test_errors_before_any_work(tmp_path):
    from fmzoo.train.config import ModelSection
    from fmzoo.train.reward import RewardRunSection, RewardSettings, prepare_reward, score
    run = RewardRunSection(workdir=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="decoder-only language model; 'rnn-seq2seq' is a"):
        prepare_reward(RewardSettings(model=ModelSection(source="rnn-seq2seq"), run=run))
    with pytest.raises(ConfigError, match="--max-length 300 is longer than the model's "
                                          "max_len=256"):
        prepare_reward(RewardSettings(run=run).replace(data=dict(max_length=300)))
    assert not (tmp_path / "w").exists()
    lm = tiny_config("gpt")
    with pytest.raises(ValueError, match="score\\(\\) needs a reward model"):
        score(build(lm), None, None, ["a"], ["b"])
