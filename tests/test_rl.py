"""The pure layer of online RL: rollouts (log-probs == the training forward, fixed shapes),
reward sources, and every loss formula against numpy written out by hand."""

import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.infer import decoder_for
from fmzoo.infer.generate import GenerationError
from fmzoo.models import build, get_config
from fmzoo.models.registry import init
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import rl_losses as L
from fmzoo.train.rewards import RewardError, load_rewards, parse_reward_spec
from fmzoo.train import rollout as R
from fmzoo.train.rollout import rollout, sequence_logps

RNG = np.random.default_rng(0)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def response_mask(N=4, T=10):
    """Rows with prompts of different lengths and completions of different lengths."""
    m = np.zeros((N, T), np.float32)
    for i in range(N):
        start = 2 + i % 3
        m[i, start:start + 3 + (i * 2) % 5] = 1
    return m


# ----------------------------------------------------------------------------- rollouts


PROMPTS = [[257, 5, 17, 99, 3], [257], [257, *range(40, 51)]]
KW = dict(group_size=2, max_new_tokens=7, temperature=0.8, top_k=20, eos_ids=[1, 2],
          max_length=24)


@pytest.fixture(scope="module")
def lm():
    config = get_config("gpt-tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2,
                        d_ff=64, max_len=32)
    model, params = build(config), init(config, 3)
    r = rollout(model, params, ByteTokenizer(), PROMPTS, rng=5, **KW)
    logps = sequence_logps(model, params, r.tokens, r.mask, r.response_mask, r.temperature)
    return model, params, r, logps


def test_rollout_logps_equal_the_training_forward_and_shapes_stay_fixed(lm, monkeypatch):
    model, params, r, lp = lm
    tok = ByteTokenizer()
    N, T = 6, 24
    assert r.tokens.shape == r.mask.shape == r.response_mask.shape == r.old_logps.shape == (N, T)
    assert r.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.expand(["a", "b", "c"]) == ["a", "a", "b", "b", "c", "c"]
    for b in range(N):
        p, c = PROMPTS[b // 2], r.completion_ids[b]
        n = len(p) + len(c)
        assert r.tokens[b, :n].tolist() == p + c and r.mask[b].sum() == n
        assert r.response_mask[b].tolist() == [0.0] * len(p) + [1.0] * len(c) + [0.0] * (T - n)
        assert r.has_eos[b] == (c[-1] in (1, 2)) and (r.has_eos[b] or len(c) == 7)
        assert r.completions[b] == tok.decode(c)
    lengths = [len(c) for c in r.completion_ids]
    m = r.metrics()
    assert m.pop("timing/rollout_s") > 0
    assert m.pop("rollout_tokens_per_s") == pytest.approx(sum(lengths) / r.seconds)
    assert m == {"completion_length": np.mean(lengths),
                           "completions/mean_length": np.mean(lengths),
                           "completions/min_length": min(lengths),
                           "completions/max_length": max(lengths),
                           "completions/clipped_ratio": 1 - r.has_eos.mean()}
    # old_logps sit at the positions that predict each completion token, and nowhere else
    assert ((r.old_logps != 0) <= (np.asarray(L.action_mask(r.response_mask)) > 0)).all()
    close(lp, r.old_logps)
    # other prompt lengths, same count: the cached decoder and forward, nothing traced
    seen = []

    def spy(fn):
        return lambda *a, **k: seen.append(fn.__name__) or fn(*a, **k)
    monkeypatch.setattr(R, "forward_logps", spy(R.forward_logps))
    monkeypatch.setattr(R, "decoder_for",
                        lambda *a: (lambda d: seen.append(d[1]) or d)(decoder_for(*a)))
    r2 = rollout(model, params, tok, [[257], [257, 9], [257, *range(60, 76)]], rng=6, **KW)
    close(sequence_logps(model, params, r2.tokens, r2.mask, r2.response_mask, r2.temperature),
          r2.old_logps)
    assert seen == [False]  # decoder_for said "not new"; forward_logps was not traced again
    monkeypatch.undo()
    # a greedy rollout records log-probs at temperature 1
    g = rollout(model, params, None, PROMPTS, rng=0, **{**KW, "temperature": 0.0})
    assert g.temperature == 1.0 and g.completions == [""] * N
    close(sequence_logps(model, params, g.tokens, g.mask, g.response_mask, 1.0), g.old_logps)


def test_fresh_rollout_ratio_is_one_and_nothing_is_clipped(lm):
    _, _, r, logps = lm
    adv, _ = L.grpo_advantages(RNG.normal(size=6), 2)
    mask = L.action_mask(r.response_mask)
    loss, m = L.clipped_policy_loss(logps, r.old_logps, adv, mask, epsilon_low=0.2)
    assert float(m["clip_ratio"]) == 0.0
    close(loss, -np.mean(np.asarray(adv)))  # ratio 1: the loss is -mean advantage


def test_rollout_bad_input(lm):
    model, params = lm[:2]
    with pytest.raises(GenerationError, match="only 4 fit"):
        rollout(model, params, None, [[257] * 5], group_size=2, max_new_tokens=4,
                max_length=8)
    with pytest.raises(GenerationError, match="group_size must be an integer >= 1"):
        rollout(model, params, None, [[257]], group_size=0, max_new_tokens=4, max_length=8)
    with pytest.raises(GenerationError, match="max_length must be an integer in"):
        rollout(model, params, None, [[257]], group_size=1, max_new_tokens=4, max_length=99)


# --------------------------------------------------------------------------- advantages


def test_grpo_advantages_match_the_formula():
    G, r = 4, RNG.normal(size=12).astype(np.float32)
    groups = r.reshape(-1, G)
    want = ((groups - groups.mean(1, keepdims=True)) /
            (groups.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    adv, m = L.grpo_advantages(r, G)
    close(adv, want)
    close(m["reward"], r.mean())
    close(m["reward_std"], r.std(ddof=1))
    close(L.grpo_advantages(r, G, scale_rewards=False)[0],
          (groups - groups.mean(1, keepdims=True)).reshape(-1))
    close(L.grpo_advantages(r, G, scale_rewards="batch")[0],
          ((groups - groups.mean(1, keepdims=True)) / (r.std(ddof=1) + 1e-4)).reshape(-1))


def test_rloo_advantages_match_the_formula():
    G, r = 3, RNG.normal(size=9).astype(np.float32)
    want = np.array([r[i] - np.mean([r[j] for j in range(i // G * G, i // G * G + G) if j != i])
                     for i in range(9)])
    adv, _ = L.rloo_advantages(r, G)
    close(adv, want)
    close(L.rloo_advantages(r, G, normalize=True)[0],
          (want - want.mean()) / (want.std(ddof=1) + 1e-4))


def test_equal_rewards_give_zero_advantage_and_group_size_one_is_refused():
    r = np.array([1.0, 1, 1, 1, 0, 1, 0, 0], np.float32)
    adv, m = L.grpo_advantages(r, 4)
    assert np.all(np.asarray(adv)[:4] == 0)
    assert float(m["frac_reward_zero_std"]) == 0.5
    assert np.all(np.asarray(L.rloo_advantages(r, 4)[0])[:4] == 0)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        L.grpo_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        L.rloo_advantages(r, 3)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        L.grpo_advantages(r, 4, scale_rewards="token")


# ---------------------------------------------------------------------- KL and PG loss


def test_kl_estimators():
    lp, ref = RNG.normal(size=(3, 5)), RNG.normal(size=(3, 5))
    close(L.kl_k1(lp, ref), lp - ref)
    close(L.kl_k3(lp, ref), np.exp(ref - lp) - (ref - lp) - 1)
    assert np.all(np.asarray(L.kl_k3(lp, ref)) >= 0)
    close(L.kl_estimate(lp, lp, "k3"), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="k1, k3"):
        L.kl_estimate(lp, ref, "k2")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_clipped_policy_loss_matches_the_formula(loss_type):
    N, T, lo, hi, beta = 4, 10, 0.2, 0.28, 0.05
    mask = response_mask(N, T)
    old = RNG.normal(size=(N, T)).astype(np.float32) - 2
    logp = old + RNG.normal(scale=0.3, size=(N, T)).astype(np.float32)
    ref = old + RNG.normal(scale=0.1, size=(N, T)).astype(np.float32)
    adv = RNG.normal(size=N).astype(np.float32)
    loss, m = L.clipped_policy_loss(logp, old, adv, mask, epsilon_low=lo, epsilon_high=hi,
                                    loss_type=loss_type, beta=beta, ref_logps_NT=ref,
                                    max_completion_length=8)
    ratio = np.exp(logp - old)
    A = adv[:, None]
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per = -np.minimum(ratio * A, np.clip(ratio, 1 - lo, 1 + hi) * A) + beta * kl
    if loss_type == "grpo":
        want, tokens = np.mean((per * mask).sum(1) / mask.sum(1)), N
    elif loss_type == "dr_grpo":
        want, tokens = (per * mask).sum() / (N * 8), N
    else:
        want, tokens = (per * mask).sum() / mask.sum(), mask.sum()
    close(loss, want)
    assert float(m["tokens"]) == tokens
    close(m["kl"], (kl * mask).sum() / mask.sum())
    region = ((ratio < 1 - lo) & (A < 0)) | ((ratio > 1 + hi) & (A > 0))
    close(m["clip_ratio"], (region * mask).sum() / mask.sum())
    assert 0 < float(m["clip_ratio"]) < 1  # the test data does exercise the clip
    # the gradient flows through logp only (old and ref are constants)
    g = jax.grad(lambda x: L.clipped_policy_loss(x, old, adv, mask, loss_type=loss_type,
                                                 max_completion_length=8)[0])(jnp.asarray(logp))
    assert np.all(np.asarray(g)[mask == 0] == 0)


def test_policy_loss_bad_input():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="loss_type 'ppo' is not one of"):
        L.clipped_policy_loss(x, x, np.zeros(2), x, loss_type="ppo")
    with pytest.raises(ValueError, match="pass the rollout's max_new_tokens"):
        L.clipped_policy_loss(x, x, np.zeros(2), x, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="pass ref_logps_NT"):
        L.clipped_policy_loss(x, x, np.zeros(2), x, beta=0.1)


# ---------------------------------------------------------------------------------- PPO


def gae_loop(rewards, values, gamma, lam):
    """TRL's loop (ppo_trainer.py), on rewards and values that are 0 off the response."""
    N, T = rewards.shape
    last, out = np.zeros(N), []
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = np.stack(out[::-1], 1)
    return adv, adv + values


def test_gae_matches_a_python_loop():
    mask = response_mask(5, 12)
    rewards = RNG.normal(size=mask.shape).astype(np.float32)
    values = RNG.normal(size=mask.shape).astype(np.float32)
    adv, ret = L.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    want_adv, want_ret = gae_loop(rewards * mask, values * mask, 0.97, 0.9)
    close(adv, want_adv * mask)
    close(ret, want_ret * mask)
    # gamma = lam = 1 with zero values: the advantage is the reward-to-go
    adv1, _ = L.gae(rewards, np.zeros_like(values), mask, gamma=1.0, lam=1.0)
    close(adv1, np.cumsum((rewards * mask)[:, ::-1], 1)[:, ::-1] * mask)


def test_whitening_entropy_and_ppo_rewards():
    x = RNG.normal(loc=3, size=(4, 10)).astype(np.float32)
    mask = response_mask(4, 10)
    sel = x[mask > 0]
    close(L.masked_whiten(x, mask), (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8))
    close(L.masked_whiten(x, mask, shift_mean=False),
          (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8) + sel.mean())
    logits = RNG.normal(size=(2, 3, 7)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    close(L.entropy_from_logits(logits), -(p * np.log(p)).sum(-1))
    lp, ref = RNG.normal(size=(4, 10)), RNG.normal(size=(4, 10))
    scores = np.array([1.0, -2.0, 0.5, 3.0])
    rew, kl, ns = L.ppo_rewards(scores, lp, ref, mask, kl_coef=0.1)
    last = np.zeros_like(mask)
    for i in range(4):
        last[i, np.nonzero(mask[i])[0][-1]] = scores[i]
    close(kl, (lp - ref) * mask)
    close(rew, -0.1 * (lp - ref) * mask + last)
    close(L.ppo_rewards(scores, lp, ref, mask, kl_coef=0.1, kl_estimator="k3")[1],
          (np.exp(ref - lp) - (ref - lp) - 1) * mask)
    m = L.ppo_rollout_metrics(scores, kl, ns, lp, mask)
    close(m["objective/kl"], ((lp - ref) * mask).sum(1).mean())
    close(m["objective/entropy"], (-lp * mask).sum(1).mean())
    close(m["objective/rlhf_reward"], (-0.1 * (lp - ref) * mask).sum(1).mean() + scores.mean())


def test_ppo_loss_matches_the_formula():
    N, T, c, cv, vf = 4, 10, 0.2, 0.3, 0.1
    mask = response_mask(N, T)
    old = RNG.normal(size=(N, T)).astype(np.float32)
    logp = old + RNG.normal(scale=0.3, size=(N, T)).astype(np.float32)
    adv = RNG.normal(size=(N, T)).astype(np.float32)
    old_v = RNG.normal(size=(N, T)).astype(np.float32)
    v = old_v + RNG.normal(scale=0.5, size=(N, T)).astype(np.float32)
    ret = RNG.normal(size=(N, T)).astype(np.float32)
    ent = RNG.uniform(size=(N, T)).astype(np.float32)
    loss, m = L.ppo_loss(logp, old, adv, v, old_v, ret, mask, cliprange=c,
                         cliprange_value=cv, vf_coef=vf, entropy_NT=ent)
    mm = lambda a: (a * mask).sum() / mask.sum()  # noqa: E731
    ratio = np.exp(logp - old)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - c, 1 + c)
    v1, v2 = (v - ret) ** 2, (np.clip(v, old_v - cv, old_v + cv) - ret) ** 2
    pg, vl = mm(np.maximum(pg1, pg2)), 0.5 * mm(np.maximum(v1, v2))
    close(loss, pg + vf * vl)
    close(m["loss/policy_avg"], pg)
    close(m["loss/value_avg"], vl)
    close(m["policy/clipfrac_avg"], mm(pg2 > pg1))
    close(m["val/clipfrac_avg"], mm(v2 > v1))
    close(m["policy/approxkl_avg"], 0.5 * mm((logp - old) ** 2))
    close(m["policy/entropy_avg"], mm(ent))
    assert 0 < float(m["policy/clipfrac_avg"]) < 1 and 0 < float(m["val/clipfrac_avg"]) < 1


# -------------------------------------------------------------------------------- rewards


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rl_rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
        def short(prompts, completions, **kwargs):
            return [1.0]
        def boom(prompts, completions, **kwargs):
            raise KeyError("answer")
        def nan(prompts, completions, **kwargs):
            return [float("nan")] * len(completions)
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rl_rewards"
    sys.modules.pop("my_rl_rewards", None)


def test_reward_spec_parsing():
    assert parse_reward_spec("checker") == [("checker", 1.0)]
    assert parse_reward_spec("tasks/add:0.5, m:f:2,m:g") == [("tasks/add", 0.5), ("m:f", 2.0),
                                                              ("m:g", 1.0)]
    assert parse_reward_spec("m:f:-1e-1") == [("m:f", -0.1)]
    with pytest.raises(RewardError, match="empty entry"):
        parse_reward_spec("a,,b")
    with pytest.raises(RewardError, match="--reward is empty"):
        parse_reward_spec(" ")


def test_weighted_rewards_with_checker_and_missing_eos_penalty(reward_module):
    rewards = load_rewards(f"tasks/add:2,{reward_module}:length:0.5", missing_eos_penalty=1.5)
    prompts = ["What is 12+30?", "What is 1+1?", "What is 5+5?"]
    completions = ["42<|end|>", "3", "10"]
    total, per = rewards.score(prompts, completions, has_eos=[True, True, False])
    close(per["tasks/add"], [1, 0, 1])
    close(per[f"{reward_module}:length"], [9, 1, 2])
    close(total, [2 + 4.5, 0.5, 2 + 1 - 1.5])
    assert rewards(prompts, completions, has_eos=[True] * 3) == [6.5, 0.5, 3.0]
    # 'checker' takes each row's task and answer columns
    got = load_rewards("checker")(["What is 1+1?", "Reverse the word 'abc'."], ["2", "abc"],
                                  task=["add", "reverse"], answer=["2", "cba"])
    assert got == [1.0, 0.0]


def test_reward_errors(reward_module):
    m = reward_module
    with pytest.raises(RewardError, match="cannot import it"):
        load_rewards("no_such_module_xyz:fn")
    with pytest.raises(RewardError, match="cannot import it"):
        load_rewards(f"{m}:missing")
    with pytest.raises(RewardError, match="is not a function"):
        load_rewards(f"{m}:NOT_A_FUNCTION")
    with pytest.raises(RewardError, match="'nonsense' is not a known reward"):
        load_rewards("nonsense")
    with pytest.raises(RewardError, match="same reward twice"):
        load_rewards("checker:1,checker:2")
    with pytest.raises(RewardError, match="returned 1 rewards for 2 completions"):
        load_rewards(f"{m}:short").score(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match=f"reward {m}:boom raised KeyError"):
        load_rewards(f"{m}:boom").score(["a"], ["x"])
    with pytest.raises(RewardError, match="must be a finite number"):
        load_rewards(f"{m}:nan").score(["a"], ["x"])
    with pytest.raises(RewardError, match="needs each row's task"):
        load_rewards("checker").score(["What is 1+1?"], ["2"])
    with pytest.raises(RewardError, match="missing_eos_penalty needs has_eos"):
        load_rewards("tasks/add", missing_eos_penalty=1.0).score(["What is 1+1?"], ["2"])
