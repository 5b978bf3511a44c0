"""Judges (RLAIF) and the reward-model / judge reward sources: the LM judge against a hand
computation from one forward, swap invariance and two-label normalisation, the reward-model
judge against sigmoid(score difference), the function judge with a task checker, and the
errors (a tokenizer that is not the judge's, group size 1)."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models import build, get_config
from fmzoo.models.registry import init
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import judges as J
from fmzoo.train import reward_sources as RS
from fmzoo.train.reward import score, with_score_head
from fmzoo.train.rewards import RewardError, build_source, load_rewards

PROMPTS = ["What is 12+30?", "Reverse the word 'cat'."]
A = ["42", "tac"]
B = ["43 is my answer", "cta"]


def tiny(seed, **kw):
    config = get_config("gpt-tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                        max_len=256, **kw)
    return build(config), jax.jit(init, static_argnums=(0, 1))(config, seed)


@pytest.fixture(scope="module")
def lm_judge():
    model, params = tiny(1)
    return J.LMJudge(model, params, ByteTokenizer(), batch_size=4)


def test_lm_judge_swap_invariant_and_normalised(lm_judge):
    p_ab = lm_judge.probabilities(PROMPTS, A, B)
    p_ba = lm_judge.probabilities(PROMPTS, B, A)
    assert p_ab.dtype == np.float32 and p_ab.shape == (2,)
    np.testing.assert_allclose(p_ab, 1 - p_ba, atol=1e-6)
    # a random tiny judge barely prefers, but it does, and differently per pair
    assert np.all((p_ab > 0) & (p_ab < 1)) and np.all(p_ab != 0.5) and p_ab[0] != p_ab[1]
    rows = [lm_judge._ids(PROMPTS[0], A[0], B[0]), lm_judge._ids(PROMPTS[1], B[1], A[1])]
    two = lm_judge.label_probs(rows)
    np.testing.assert_allclose(two.sum(-1), 1.0, atol=1e-6)  # renormalised over "1" and "2"
    # a pair judged against itself is a coin flip after averaging both orders
    np.testing.assert_allclose(lm_judge.probabilities(PROMPTS, A, A), 0.5, atol=1e-6)


def test_lm_judge_equals_one_forward_by_hand(lm_judge):
    tok, model, params = ByteTokenizer(), lm_judge.model, lm_judge.params
    one, two = tok.encode("1")[0], tok.encode("2")[0]

    def by_hand(first, second):
        text = J.DEFAULT_TEMPLATE.format(prompt=PROMPTS[0], first=first, second=second)
        # the byte tokenizer's chat template: bos <|user|> text <|end|> <|assistant|>
        ids = [257, tok.role("user"), *tok.encode(text), tok.role("end"), tok.role("assistant")]
        logits = model.apply({"params": params}, jnp.asarray([ids], jnp.int32))[0, -1]
        l1, l2 = float(logits[one]), float(logits[two])
        return np.exp(l1) / (np.exp(l1) + np.exp(l2))
    want = (by_hand(A[0], B[0]) + (1 - by_hand(B[0], A[0]))) / 2
    got = lm_judge.probabilities(PROMPTS[:1], A[:1], B[:1])
    np.testing.assert_allclose(got, [want], atol=2e-5)


def test_lm_judge_cuts_long_inputs_and_reads_messages(lm_judge):
    long = "x" * 400
    before = lm_judge.truncated
    p = lm_judge.probabilities([long], ["a" * 300], ["b"])
    assert lm_judge.truncated == before + 1 and p.shape == (1,)
    msgs = [[{"role": "user", "content": PROMPTS[0]}]]
    np.testing.assert_allclose(
        lm_judge.probabilities(msgs, [[{"role": "assistant", "content": A[0]}]], [B[0]]),
        lm_judge.probabilities(PROMPTS[:1], A[:1], B[:1]), atol=1e-6)
    with pytest.raises(J.JudgeError, match="a judge reads text"):
        lm_judge.probabilities([[257, 5]], ["a"], ["b"])


def test_judge_of_another_tokenizer_is_refused(lm_judge):
    model, params = lm_judge.model, lm_judge.params

    big = ByteTokenizer()  # e.g. the policy's GPT-2 tokenizer handed to a byte-level judge
    big.vocab_size = 50257
    with pytest.raises(J.JudgeError, match="tokenizer of 50257 tokens but the judge model's "
                                           "vocabulary is 264"):
        J.LMJudge(model, params, big)

    class Shifted(ByteTokenizer):  # claims to fit, but its ids have no row in the judge
        def encode(self, text, **kw):
            ids = super().encode(text, **kw)
            return ids if text in ("1", "2") else [i + 1000 for i in ids]
    judge = J.LMJudge(model, params, Shifted())
    with pytest.raises(J.JudgeError, match="produced id 1.*outside the judge model's "
                                           "vocabulary of 264"):
        judge.probabilities(["hi"], ["a"], ["b"])

    class WordTok(ByteTokenizer):
        def encode(self, text, **kw):
            return [300] if text in ("1", "2") else super().encode(text, **kw)
    with pytest.raises(J.JudgeError, match="gives '1' the id 300, outside"):
        J.LMJudge(model, params, WordTok())

    class MultiTok(ByteTokenizer):
        def encode(self, text, **kw):
            return [49, 49] if text == "1" else super().encode(text, **kw)
    with pytest.raises(J.JudgeError, match="encodes the label '1' as 2 tokens"):
        J.LMJudge(model, params, MultiTok())


@pytest.fixture(scope="module")
def rm():
    config = get_config("gpt-tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                        max_len=64, head="score")
    lm_params = jax.jit(init, static_argnums=(0, 1))(config.replace(head="lm"), 0)
    return build(config), with_score_head(lm_params, config, 7)


def test_reward_model_judge_is_sigmoid_of_score_difference(rm):
    model, params = rm
    tok = ByteTokenizer()
    ra = np.asarray(score(model, params, tok, PROMPTS, A))
    rb = np.asarray(score(model, params, tok, PROMPTS, B))
    got = J.RewardModelJudge(model, params, tok).probabilities(PROMPTS, A, B)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-(ra - rb))), atol=1e-6)
    # the same model as a --reward source: its scores
    fn = RS.reward_model_reward(model, params, tok)
    np.testing.assert_allclose(load_rewards([fn])(PROMPTS, A), ra, atol=1e-6)
    with pytest.raises(J.JudgeError, match="needs a decoder-only language model"):
        J.LMJudge(model, params, tok)


def test_function_judge_with_the_task_checker():
    judge = J.load_judge("tasks/mix")
    assert isinstance(judge, J.FunctionJudge)
    got = judge.probabilities(PROMPTS + PROMPTS[:1], ["42", "cta", "41"], ["43", "tac", "40"])
    assert got.tolist() == [1.0, 0.0, 0.5]  # right vs wrong, wrong vs right, both wrong
    # 'checker' reads each row's task column
    checker = J.load_judge("checker")
    assert checker.probabilities(PROMPTS, A, B, task=["tasks/add", "tasks/reverse"],
                                 answer=["42", "tac"]).tolist() == [1.0, 1.0]
    with pytest.raises(RewardError, match="needs each row's task"):
        checker.probabilities(PROMPTS, A, B)
    with pytest.raises(J.JudgeError, match="is not a judge"):
        J.load_judge("no-such-judge")
    # agreement with the checker: itself 1, its opposite 0, ties of the checker left out
    flipped = type("Flip", (), {"probabilities": lambda self, *a, **k:
                                1 - judge.probabilities(*a, **k)})()
    args = (PROMPTS + PROMPTS[:1], ["42", "cta", "41"], ["43", "tac", "40"])
    assert J.agreement(judge, judge, *args) == {"agreement": 1.0, "pairs": 2,
                                                "reference_ties": 1}
    assert J.agreement(flipped, judge, *args)["agreement"] == 0.0


def test_judge_reward_is_mean_win_probability_and_needs_groups():
    class Fixed:  # P(first better) from a fixed strength per completion
        def probabilities(self, prompts, first, second, **_):
            s = {"a": 2.0, "b": 1.0, "c": 0.0}
            return np.asarray([1 / (1 + np.exp(s[y] - s[x])) for x, y in zip(first, second)])
    fn = RS.judge_reward(Fixed())
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    got = fn(["p"] * 3 + ["q"] * 3, ["a", "b", "c", "c", "c", "a"], group_size=3)
    want = [(sig(1) + sig(2)) / 2, (sig(-1) + sig(1)) / 2, (sig(-2) + sig(-1)) / 2,
            (0.5 + sig(-2)) / 2, (0.5 + sig(-2)) / 2, sig(2)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(RewardError, match="needs --num-generations >= 2"):
        fn(["p"], ["a"], group_size=1)
    with pytest.raises(RewardError, match="needs group_size"):
        fn(["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match="prompts differ"):
        fn(["p", "q"], ["a", "b"], group_size=2)
    # through --reward: the judge source, with the task checker as the judge
    rewards = load_rewards("judge:tasks/add")
    assert rewards(["What is 1+1?"] * 2, ["2", "3"], group_size=2) == [1.0, 0.0]
    with pytest.raises(RewardError, match="needs --num-generations >= 2"):
        rewards(["What is 1+1?"], ["2"], group_size=1)


def test_reward_spec_routing(tmp_path, monkeypatch):
    lm_dir, rm_dir = tmp_path / "lm", tmp_path / "rm"
    for d, head in ((lm_dir, "lm"), (rm_dir, "score")):
        d.mkdir()
        (d / "fmzoo_run.json").write_text("{}")
    from fmzoo.models import workdir
    heads = {str(lm_dir): "lm", str(rm_dir): "score"}
    monkeypatch.setattr(workdir, "read_run_file", lambda p: {"config": get_config(
        "gpt-tiny", head=heads[str(p)])})
    with pytest.raises(RewardError, match="holds a language model, not a reward model.*"
                                          f"--reward judge:{lm_dir}"):
        build_source(str(lm_dir))
    import fmzoo
    seen = []
    monkeypatch.setattr(fmzoo, "load", lambda p: seen.append(p) or (_ for _ in ()).throw(
        RuntimeError("loaded")))
    with pytest.raises(RuntimeError, match="loaded"):
        build_source(str(rm_dir))  # routed to the reward-model source, which loads it
    assert seen == [str(rm_dir)]
    with pytest.raises(RewardError, match="judge: names no judge"):
        build_source("judge:")
    with pytest.raises(RewardError, match="--reward judge:nope: --judge 'nope' is not a judge"):
        build_source("judge:nope")


def test_load_judge_routes_models(tmp_path, monkeypatch, lm_judge, rm):
    import fmzoo
    from fmzoo.models.bundle import Loaded
    lm_dir, rm_dir = tmp_path / "lm", tmp_path / "rm"
    lm_dir.mkdir(), rm_dir.mkdir()
    made = {str(lm_dir): Loaded(lm_judge.model, lm_judge.params, lm_judge.model.config, None),
            str(rm_dir): Loaded(rm[0], rm[1], rm[0].config, ByteTokenizer())}
    monkeypatch.setattr(fmzoo, "load", lambda p, dtype=None: made[p])
    assert isinstance(J.load_judge(str(lm_dir)), J.LMJudge)  # no tokenizer stored: bytes
    assert isinstance(J.load_judge(str(rm_dir)), J.RewardModelJudge)
    assert isinstance(J.load_judge("tasks/add"), J.FunctionJudge)
    module = types.ModuleType("my_judges")  # a user's TRL reward function
    module.prefer = lambda prompts, completions, **kw: [float(len(c)) for c in completions]
    monkeypatch.setitem(sys.modules, "my_judges", module)
    fn_judge = J.load_judge("my_judges:prefer")
    assert fn_judge.probabilities(["p", "p"], ["long", "a"], ["b", "a"]).tolist() == [1.0, 0.5]
    with pytest.raises(J.JudgeError, match="--judge-tokenizer .*: no tokenizer there"):
        J.load_judge(str(lm_dir), tokenizer=str(tmp_path))
