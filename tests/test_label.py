"""`fmzoo label` (RLAIF): two samples per prompt, judged, written as TRL preference JSONL
that train/pref_records reads; fixed-shape chunks; atomic output; errors before work."""

import json
import os

import jax
import numpy as np
import pytest

from fmzoo.models import build, get_config
from fmzoo.models.bundle import Loaded
from fmzoo.models.registry import init
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import judges as J
from fmzoo.train import tasks
from fmzoo.train import label as L
from fmzoo.train import pref_records
from fmzoo.train import rollout as R
from fmzoo.train.sft_records import read_records


def tiny(max_len, seed, **kw):
    config = get_config("gpt-tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
                        max_len=max_len, **kw)
    return config, build(config), jax.jit(init, static_argnums=(0, 1))(config, seed)


@pytest.fixture(scope="module")
def policy():
    config, model, params = tiny(48, 3)
    return Loaded(model, params, config, ByteTokenizer(), source="tiny-policy")


@pytest.fixture(scope="module")
def lm_judge():
    _, model, params = tiny(256, 1)
    return J.LMJudge(model, params, ByteTokenizer(), batch_size=4)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Say {w}.", "answer": w} for w in ("yes", "no", "up", "down", "hi")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


KW = dict(max_new_tokens=8, temperature=1.0, batch_size=2, progress=False)


def test_label_writes_pairs_that_pref_records_reads_and_the_judge_agrees(
        policy, lm_judge, prompts_file, tmp_path, monkeypatch):
    calls = []
    real = R.rollout
    monkeypatch.setattr(R, "rollout", lambda m, p, t, ids, **kw: calls.append(
        (len(ids), kw["group_size"], kw["max_length"])) or real(m, p, t, ids, **kw))
    out = str(tmp_path / "out" / "pairs.jsonl")
    s = L.label(policy, lm_judge, prompts_file, out, seed=1, **KW)
    assert calls == [(2, 2, 48)] * 3  # 5 prompts in full chunks of 2: one decoder shape
    assert s["prompts"] == 5 and s["pairs"] + s["ties"] + s["empty"] == 5 and s["pairs"] >= 3
    records = [json.loads(x) for x in open(out)]
    assert len(records) == s["pairs"] == pref_records.check_data(out)
    parsed = [rec for _, rec in read_records(out, pref_records)]
    assert [p["chosen"] for p in parsed] == [r["chosen"] for r in records]
    answers = {f"Say {w}.": w for w in ("yes", "no", "up", "down", "hi")}
    for r in records:
        assert r["answer"] == answers[r["prompt"]]  # the prompt's columns are kept
        assert r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]
        p = lm_judge.probabilities([r["prompt"]], [r["chosen"]], [r["rejected"]])[0]
        assert p > 0.5 and r["chosen_probability"] == pytest.approx(p, abs=1e-6)
    assert s["mean_confidence"] == pytest.approx(
        np.mean([r["chosen_probability"] - 0.5 for r in records]), abs=1e-9)
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]
    # the same seed gives the same file
    again = str(tmp_path / "again.jsonl")
    L.label(policy, lm_judge, prompts_file, again, seed=1, **KW)
    assert open(again).read() == open(out).read()


class Longer:
    """Prefers the longer response; equal lengths tie."""

    def probabilities(self, prompts, first, second, **columns):
        assert set(columns) == {"answer", "task"}  # the task's columns reach the judge
        n = [len(J.as_text(x, "")) for x in first], [len(J.as_text(x, "")) for x in second]
        return np.sign(np.subtract(*n)) * 0.5 + 0.5


def test_label_conversational_prompts_and_ties(policy, tmp_path):
    out = str(tmp_path / "chat.jsonl")
    s = L.label(policy, Longer(), "tasks/add", out, limit=4, seed=0, **KW)
    records = [rec for _, rec in read_records(out, pref_records)]
    assert len(records) == s["pairs"] and s["pairs"] + s["ties"] + s["empty"] == 4
    for r in records:  # messages in, messages out: assistant replies
        assert r["prompt"][-1]["role"] == "user"
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"])


def test_an_error_midway_leaves_no_output(policy, lm_judge, prompts_file, tmp_path):
    class Breaks:
        n = 0

        def probabilities(self, *a, **k):
            self.n += 1
            if self.n == 2:
                raise RuntimeError("judge crashed")
            return lm_judge.probabilities(*a, **k)
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(RuntimeError, match="judge crashed"):
        L.label(policy, Breaks(), prompts_file, str(out), **KW)
    assert os.listdir(tmp_path) == ["prompts.jsonl"]
    out.write_text("old\n")  # an existing file stays whole
    with pytest.raises(RuntimeError, match="judge crashed"):
        L.label(policy, Breaks(), prompts_file, str(out), **KW)
    assert out.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == [
        "pairs.jsonl", "prompts.jsonl"]
    # a judge that never prefers -> nothing to write, said so
    with pytest.raises(L.LabelError, match="no pair to write: of 5 prompts, 5 gave tied"):
        L.label(policy, type("Tie", (), {"probabilities": lambda self, p, a, b, **k:
                                         np.full(len(p), 0.5)})(), prompts_file,
                str(tmp_path / "none.jsonl"), **KW)
    assert not (tmp_path / "none.jsonl").exists()


def test_bad_input_is_refused_before_sampling(policy, lm_judge, prompts_file, tmp_path,
                                               monkeypatch):
    monkeypatch.setattr(R, "rollout", lambda *a, **k: pytest.fail("sampled"))
    out = str(tmp_path / "p.jsonl")
    cases = [
        (dict(out=str(tmp_path / "p.json")), "name a .jsonl file"),
        (dict(temperature=0.0), "greedy decoding gives the same response twice"),
        (dict(max_new_tokens=44), "prompts are longer than 4 tokens"),
        (dict(max_length=99), r"--max-length must be in \(max_new_tokens=8, the policy's "
                              "max_len=48\\]"),
        (dict(judge="nope"), "--judge 'nope' is not a judge"),
    ]
    for change, message in cases:
        kw = {**KW, "out": out, "judge": lm_judge, **change}
        with pytest.raises(ValueError, match=message):
            L.label(policy, kw.pop("judge"), prompts_file, kw.pop("out"), **kw)
    config, model, params = tiny(48, 0, head="score")
    with pytest.raises(L.LabelError, match="a reward model .*cannot sample"):
        L.label(Loaded(model, params, config, ByteTokenizer()), lm_judge, prompts_file, out,
                **KW)
    assert not os.path.exists(out)


def test_cli_label_smoke(tmp_path, capsys, monkeypatch):
    from fmzoo.cli import main
    (tmp_path / "my_judge.py").write_text(
        "def weight(prompts, completions, **kw):\n"
        "    return [float(sum(map(ord, c))) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pairs.jsonl"
    code = main(["label", "--model", "gpt-tiny", "--judge", "my_judge:weight", "--data",
                 "tasks/add", "--data-opt", "digits=3", "--out", str(out), "--limit", "3",
                 "--max-new-tokens", "6", "--max-length", "64", "--batch-size", "2",
                 "--seed", "4"])
    text = capsys.readouterr()
    assert code == 0, text.err
    n = pref_records.check_data(str(out))
    assert f"wrote {n} pairs to {out} from 3 prompts" in text.out
    three_digits = {e["prompt"] for e in tasks.examples("tasks/add", "train", digits=3)}
    for r in map(json.loads, open(out)):  # the function judge's choice: the heavier reply
        assert r["prompt"][0]["content"] in three_digits  # --data-opt reached the task
        w = [sum(map(ord, r[k][0]["content"])) for k in ("chosen", "rejected")]
        assert w[0] > w[1] and r["chosen_probability"] == 1.0
    assert main(["label", "--model", "gpt-tiny", "--judge", "my_judge:weight", "--data",
                 "tasks/add", "--out", str(tmp_path / "x.txt")]) == 2
    assert "error: --out" in capsys.readouterr().err
