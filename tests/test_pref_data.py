"""Preference data: TRL preference JSONL, embedded pairs, model pairs, the batch contract."""

import json
import os

import numpy as np
import pytest
from test_sft_data import _chatml_tokenizer

from fmzoo.models.chat import end_of_turn_ids
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import pref_data, pref_records, pref_tasks, tasks
from fmzoo.train.text_data import UserDataError

TOK = ByteTokenizer()
SMALL = {"num_train": 12, "num_validation": 3, "num_test": 3}
USER = lambda text: {"role": "user", "content": text}  # noqa: E731
BOT = lambda text: {"role": "assistant", "content": text}  # noqa: E731
RECORDS = [
    {"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " five", "margin": 1.5},
    {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},  # implicit, strings
    {"prompt": [USER("hi")], "chosen": [BOT("hello")], "rejected": [BOT("hello")]},
    {"chosen": [USER("a"), BOT("b"), USER("c"), BOT("right")],  # implicit, conversations
     "rejected": [USER("a"), BOT("b"), USER("c"), BOT("wrong!")]},
]


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _batches(name, tmp_path, tok=TOK, **kw):
    kw = {"batch_size": 3, "max_length": 48, "shuffle": False, "num_epochs": 1,
          "shard_index": 0, "shard_count": 1, "data_dir": str(tmp_path / "tfds"), **kw}
    return list(pref_data.pref_batches(name, tok, **kw))


def _pairs(batches):
    """Per real pair: (index, margin, [(ids, response ids) for chosen, rejected])."""
    out = []
    for b in batches:
        for r in np.flatnonzero(b["mask"].any(axis=(1, 2))):
            sides = [(b["tokens"][r, k][b["mask"][r, k] > 0].tolist(),
                      b["tokens"][r, k][b["response_mask"][r, k] > 0].tolist())
                     for k in range(2)]
            out.append((int(b["index"][r]), float(b["margin"][r]), sides))
    return out


def test_extract_prompt_as_trl():
    assert pref_records.extract_prompt("Q: hi A: yes", "Q: hi A: no") == \
        ("Q: hi A:", " yes", " no")
    conv = pref_records.extract_prompt(RECORDS[3]["chosen"], RECORDS[3]["rejected"])
    assert conv == (RECORDS[3]["chosen"][:3], [BOT("right")], [BOT("wrong!")])
    same = pref_records.extract_prompt([USER("q"), BOT("x")], [USER("q"), BOT("x")])
    assert same == ([USER("q")], [BOT("x")], [BOT("x")])  # chosen == rejected is allowed
    for c, r, msg in [("abc", "abc", "the same text"), ("yes", "no", "share no prompt"),
                      ("ab", "abc", "empty \"chosen\" response"),
                      ([USER("a"), BOT("x")], [USER("b"), BOT("x")], "share no prompt"),
                      ([USER("a"), BOT("x"), USER("b"), BOT("y")],
                       [USER("a"), BOT("x"), USER("c"), BOT("y")], "differ before"),
                      ("a", [USER("a")], "both must be strings or both lists")]:
        with pytest.raises(UserDataError, match=msg):
            pref_records.extract_prompt(c, r, "f.jsonl:3")


def test_batch_contract_and_tokenisation_invariants(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", RECORDS * 2)  # 8 records: the last is held out
    assert pref_data.pref_eval_split(path, data_dir=str(tmp_path / "tfds")) == "validation"
    batches = _batches(path, tmp_path) + _batches(path, tmp_path, split="validation")
    b = batches[0]
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "tokens": ((3, 2, 48), "int32"), "mask": ((3, 2, 48), "int32"),
        "response_mask": ((3, 2, 48), "float32"), "margin": ((3,), "float32"),
        "index": ((3,), "int32")}
    pairs = _pairs(batches)  # TFDS stores a split in its own (fixed) order
    assert [i for i, _, _ in pairs] == [*range(7), 0]  # the index within its split
    assert sorted(m for _, m, _ in pairs) == [0] * 6 + [1.5] * 2
    eot = set(end_of_turn_ids(TOK))
    for _, _, sides in pairs:
        (c_ids, c_resp), (r_ids, r_resp) = sides
        p = len(c_ids) - len(c_resp)
        prompt = c_ids[:p]
        assert c_ids[p:] == c_resp and r_ids[:p] == prompt and r_ids[p:] == r_resp
        for ids, resp in sides:
            assert ids.count(TOK.bos_id) == 1 and ids[0] == TOK.bos_id
            assert resp[-1] in eot and TOK.bos_id not in resp
    texts = {tuple(TOK.decode(resp) for _, resp in sides): (m, TOK.decode(sides[0][0]))
             for _, m, sides in pairs}
    assert texts == {(" 4", " five"): (1.5, "Q: 2+2? A: 4"), (" yes", " no"): (0, "Q: hi A: yes"),
                     ("hello", "hello"): (0, "hihello"), ("right", "wrong!"): (0, "abcright")}
    # padding rows of the final batch: empty, index -1
    last = batches[-1]
    assert (last["index"] == [0, -1, -1]).all() and not last["mask"][1:].any()


def test_padding_side_changes_only_padding(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", RECORDS)
    right, left = (_batches(path, tmp_path, padding_side=s) for s in ("right", "left"))
    assert _pairs(right) == _pairs(left)
    for r, le in zip(right, left):
        n = r["mask"].sum(-1)
        assert (n == le["mask"].sum(-1)).all()
        for b, k in np.ndindex(*n.shape):
            m = n[b, k]
            assert (r["mask"][b, k, :m] == 1).all() and (le["mask"][b, k, 48 - m:] == 1).all()
            assert (r["tokens"][b, k, m:] == TOK.pad_id).all()
    with pytest.raises(ValueError, match="padding_side must be one of"):
        _batches(path, tmp_path, padding_side="middle")


def test_truncation_cuts_prompt_from_the_left_then_responses(tmp_path):
    long_prompt = "p" * 30 + "END?"
    recs = [{"prompt": long_prompt, "chosen": " ok", "rejected": " no way"},
            {"prompt": "short?", "chosen": " " + "c" * 40, "rejected": " r"},
            {"prompt": "fits?", "chosen": " y", "rejected": " n"}]
    path = _write(tmp_path / "long.jsonl", recs + [recs[2]] * 97)  # 3 pairs in a batch
    with pytest.warns(UserWarning, match="truncated"):
        it = pref_data.pref_batches(path, TOK, batch_size=3, max_length=16, shuffle=False,
                                    num_epochs=1, shard_index=0, shard_count=1,
                                    data_dir=str(tmp_path / "tfds"))
        batches = list(it)
    assert it.num_truncated == 2
    pairs = sorted((len(sides[0][1]), sides) for _, _, sides in _pairs(batches))
    a, b, c = pairs[-2][1], pairs[-1][1], pairs[0][1]
    assert len(pairs) == 99  # the 100th record is held out
    eos, bos = TOK.eos_id, TOK.bos_id
    # 1: the prompt loses its start, keeps its BOS and end, the responses stay whole
    assert a[1][0] == [bos] + TOK.encode(long_prompt[-7:] + " no way") + [eos]
    assert a[0][0] == [bos] + TOK.encode(long_prompt[-7:] + " ok") + [eos]
    # 2: the whole prompt goes, then the long response loses its end (and its EOS)
    assert b[0][0] == [bos] + TOK.encode(" " + "c" * 14) and b[0][1] == b[0][0][1:]
    assert b[1][0] == [bos] + TOK.encode(" r") + [eos]
    assert c[0][0] == [bos] + TOK.encode("fits? y") + [eos]


def test_tasks_pairs_resume_and_stable_index(tmp_path):
    dd = str(tmp_path / "tfds")
    ex = pref_tasks.examples("tasks/mix", "train", **SMALL)
    assert ex == pref_tasks.examples("tasks/mix", "train", **SMALL)  # deterministic
    assert len(ex) == 60 and {e["task"] for e in ex} == set(tasks.TASK_NAMES)
    for e in ex:
        check = tasks.checker_for(e["task"])
        assert check(e, e["chosen"][0]["content"]) == 1.0
        assert check(e, e["rejected"][0]["content"]) == 0.0
        assert e["rejected"][0]["content"] != e["answer"] == e["chosen"][0]["content"]
    test_prompts = {e["prompt"][0]["content"] for e in pref_tasks.examples("tasks/mix", "test",
                                                                           **SMALL)}
    assert not test_prompts & {e["prompt"][0]["content"] for e in ex}
    assert pref_data.pref_eval_split("tasks/mix", **SMALL) == "validation"
    make = lambda: pref_data.pref_batches("tasks/mix", TOK, batch_size=4,  # noqa: E731
                                          max_length=64, seed=3, shard_index=0,
                                          shard_count=1, data_dir=dd, **SMALL)
    it = make()
    first = [next(it) for _ in range(20)]  # 80 pairs: past one epoch of 60
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(2)]
    again = make()
    again.set_state(state)
    for w in want:
        got = next(again)
        assert all(np.array_equal(w[k], got[k]) for k in w)
    by_index = {}
    for i, _, sides in _pairs(first + want):  # the same index is the same pair every epoch
        assert by_index.setdefault(i, sides) == sides
    assert sorted(by_index) == list(range(60))
    eot = set(end_of_turn_ids(TOK))
    want_pairs = {(e["chosen"][0]["content"], e["rejected"][0]["content"]) for e in ex}
    assert {tuple(TOK.decode([t for t in resp if t not in eot]) for _, resp in sides)
            for sides in by_index.values()} == want_pairs


@pytest.mark.parametrize("lines,line,message", [
    (['{"prompt": "a", "chosen": " b", "rejected": " c"}', "not json"], 2, "not valid JSON"),
    (['{"prompt": "a", "chosen": " b"}'], 1, "no \"rejected\" field"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], 1, "looks like instruction"),
    (['', '{"prompt": "a", "chosen": "", "rejected": " c"}'], 2, "empty \"chosen\" response"),
    (['{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", '
      '"content": ""}], "rejected": [{"role": "assistant", "content": "x"}]}'], 1,
     "empty \"chosen\" response"),
    (['{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", '
      '"content": "x"}], "rejected": [{"role": "assistant", "content": "x"}]}'], 1,
     "must be assistant turns"),
    (['{"prompt": [{"role": "assistant", "content": "q"}], "chosen": [{"role": '
      '"assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}'],
     1, "the prompt ends with a assistant message"),
    (['{"prompt": "a", "chosen": [], "rejected": " c"}'], 1, "all three must be strings"),
    (['{"chosen": "same", "rejected": "same"}'], 1, "cannot be told from the responses"),
    (['{"chosen": "yes", "rejected": "no"}'], 1, "share no prompt"),
    (['{"prompt": "a", "chosen": " b", "rejected": " c", "margin": "big"}'], 1,
     "\"margin\" is a string"),
])
def test_malformed_lines_name_file_and_line(tmp_path, lines, line, message):
    good = ['{"prompt": "a", "chosen": " b", "rejected": " c"}'] * 3
    path = _write(tmp_path / "bad.jsonl", good + lines)
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserDataError) as e:
        pref_data.pref_batches(path, TOK, batch_size=1, max_length=16, shard_index=0,
                               shard_count=1, data_dir=str(data_dir))
    assert str(e.value).startswith(f"{path}:{line + 3}:") and message in str(e.value)
    assert not data_dir.exists() or not os.listdir(data_dir)


def test_failure_while_preparing_tasks_leaves_nothing(tmp_path, monkeypatch):
    data_dir, real, calls = tmp_path / "tfds", pref_tasks.wrong_answer, []

    def flaky(example, seed=0):  # fails half-way through writing the first split
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk full")
        return real(example, seed)
    monkeypatch.setattr(pref_tasks, "wrong_answer", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        pref_data.load_pref_source("tasks/count", data_dir=str(data_dir), **SMALL)
    assert not (data_dir / "pref_tasks").exists()
    monkeypatch.undo()
    src = pref_data.load_pref_source("tasks/count", "test", data_dir=str(data_dir), **SMALL)
    assert len(src) == 3 and src.record(0)["format"] == "preference"


def test_hf_chat_template_pairs(tmp_path):
    tok = _chatml_tokenizer(tmp_path / "tok")
    path = _write(tmp_path / "chat.jsonl", [RECORDS[3]])
    (_, _, sides), = _pairs(_batches(path, tmp_path, tok=tok, max_length=96))
    (c_ids, c_resp), (r_ids, r_resp) = sides
    text = lambda ids: tok.decode(ids, skip_special=False)  # noqa: E731
    assert text(c_resp) == "right<|im_end|>" and text(r_resp) == "wrong!<|im_end|>"
    assert text(c_ids).endswith("<|im_start|>assistant\nright<|im_end|>\n")
    p = text(c_ids).index("right")
    assert r_ids[:len(c_ids) - len(c_resp) - 1] == c_ids[:len(c_ids) - len(c_resp) - 1]
    assert text(r_ids)[:p] == text(c_ids)[:p] and text(c_ids).count("<|im_start|>") == 4
    assert text(c_ids)[:p].endswith("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")


def test_model_pairs_from_a_tiny_random_model(tmp_path):
    from fmzoo.models import build, get_config, init
    config = get_config("gpt-tiny", n_layers=1, d_model=32, n_heads=4, d_ff=64, max_len=64)
    model, params = build(config), init(config, 0)
    ex = tasks.examples("tasks/mix", "test", num_train=5, num_validation=1, num_test=1)
    recs = pref_tasks.model_pairs(model, params, TOK, ex, samples=2, max_new_tokens=6)
    assert len(recs) == len(ex)  # random samples are wrong: every prompt gives a pair
    for e, r in zip(ex, recs):
        check = tasks.checker_for(e["task"])
        assert r["prompt"] == [USER(e["prompt"])] and r["task"] == e["task"]
        assert check(e, r["chosen"][0]["content"]) == 1.0
        assert check(e, r["rejected"][0]["content"]) == 0.0
    # a checker that finds every sample right: no pairs
    assert pref_tasks.model_pairs(model, params, TOK, ex, samples=2, max_new_tokens=6,
                                  checker=lambda e, c: 1.0) == []
    out = pref_tasks.write_jsonl(recs, str(tmp_path / "own" / "pairs.jsonl"))
    assert os.listdir(tmp_path / "own") == ["pairs.jsonl"]
    loaded = pref_data.load_pref_source(out, data_dir=str(tmp_path / "tfds"))
    assert loaded.record(0)["chosen"] == recs[0]["chosen"]
    with pytest.raises(UserDataError, match="record 1: empty \"rejected\" response"):
        pref_tasks.write_jsonl([recs[0], {**recs[0], "rejected": [BOT("")]}],
                               str(tmp_path / "own" / "bad.jsonl"))
    assert os.listdir(tmp_path / "own") == ["pairs.jsonl"]
