"""SFT data: TRL JSONL formats, labels (completion-only), packing, truncation, errors, resume."""

import collections
import json
import os

import numpy as np
import pytest

from fmzoo.models.chat import end_of_turn_ids
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import sft_data
from fmzoo.train.text_data import UserDataError

TOK = ByteTokenizer()
SMALL = {"num_train": 40, "num_validation": 5, "num_test": 5}


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _batches(path, tmp_path, **kw):
    """Every batch of every split of a file (a small file holds its last record out)."""
    kw = {"batch_size": 4, "max_length": 96, "shuffle": False, "num_epochs": 1,
          "shard_index": 0, "shard_count": 1, "data_dir": str(tmp_path / "tfds"), **kw}
    held_out = sft_data.eval_split(path, data_dir=kw["data_dir"])
    return [b for split in ("train", held_out) if split
            for b in sft_data.sft_batches(path, TOK, split=split, **kw)]


def _rows(batches):
    """Per real row: (labelled target ids, all inputs of the row)."""
    out = []
    for b in batches:
        for r in range(len(b["inputs"])):
            real = b["segment_ids"][r] > 0
            if real.any():
                lab = b["loss_mask"][r] > 0
                out.append((b["targets"][r][lab].tolist(), b["inputs"][r][real].tolist()))
    return out


def _is_reply(labelled, text):
    """The labelled targets are the reply's tokens followed by end-of-turn token(s) only."""
    reply = TOK.encode(text)
    eot = set(end_of_turn_ids(TOK))
    return labelled[:len(reply)] == reply and len(labelled) > len(reply) and \
        set(labelled[len(reply):]) <= eot


def test_prompt_completion_labels_only_completion(tmp_path):
    recs = [{"prompt": f"question {i} " + "x" * i, "completion": "the answer"}
            for i in range(6)]
    rows = _rows(_batches(_write(tmp_path / "pc.jsonl", recs), tmp_path))
    assert len(rows) == 6
    # a different prompt every time, yet the labelled tokens are the same: the completion
    for labelled, _ in rows:
        assert _is_reply(labelled, "the answer")
    conv = [{"prompt": [{"role": "user", "content": f"q{i}"}],
             "completion": [{"role": "assistant", "content": f"reply {i}"}]} for i in range(3)]
    rows = _rows(_batches(_write(tmp_path / "conv.jsonl", conv), tmp_path))
    assert [_is_reply(lab, f"reply {i}") for i, (lab, _) in enumerate(rows)] == [True] * 3
    assert sft_data.dataset_format(str(tmp_path / "conv.jsonl")) == "prompt_completion"


def test_multi_turn_labels_every_assistant_turn(tmp_path):
    rec = {"messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"},
                        {"role": "assistant", "content": "ciao"}]}
    path = _write(tmp_path / "chat.jsonl", [rec])
    assert sft_data.dataset_format(path) == "messages"
    (labelled, inputs), = _rows(_batches(path, tmp_path))
    eot = set(end_of_turn_ids(TOK))
    text = TOK.decode([t for t in labelled if t not in eot])
    assert text == "hellociao"  # both replies, no system / user text
    assert sum(t in eot for t in labelled) >= 2  # each turn's end is labelled
    (all_lab, _), = _rows(_batches(path, tmp_path, loss_on="all"))
    assert len(all_lab) == len(inputs)  # --loss-on all: every real token


def test_text_format_labels_every_token(tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"text": "abc"}, {"text": "hello world"}])
    rows = _rows(_batches(path, tmp_path))
    assert [TOK.decode(lab) for lab, _ in rows] == ["abc", "hello world"]
    assert [lab[-1] for lab, _ in rows] == [TOK.eos_id] * 2
    assert all(inp[0] == TOK.bos_id for _, inp in rows)


def test_padding_invariance(tmp_path):
    path = _write(tmp_path / "pc.jsonl", [{"prompt": "p" * 5, "completion": "c" * 7}])
    short, = _batches(path, tmp_path, max_length=32)
    long, = _batches(path, tmp_path, max_length=80, batch_size=2)
    n = int((short["segment_ids"][0] > 0).sum())
    for k in short:
        np.testing.assert_array_equal(short[k][0, :n], long[k][0, :n])
    assert not long["loss_mask"][:, n:].any() and not long["segment_ids"][:, n:].any()
    assert (long["inputs"][0, n:] == TOK.pad_id).all()


def test_packing_holds_whole_examples(tmp_path):
    recs = [{"prompt": "q" * (i % 7), "completion": "a" * (1 + i % 5)} for i in range(30)]
    path = _write(tmp_path / "pc.jsonl", recs)
    plain = _batches(path, tmp_path, max_length=40)
    packed = _batches(path, tmp_path, max_length=40, packing=True)

    def triples(batches):
        c = collections.Counter()
        for b in batches:
            real = b["segment_ids"] > 0
            c.update(zip(b["inputs"][real].tolist(), b["targets"][real].tolist(),
                         b["loss_mask"][real].tolist()))
        return c
    assert triples(packed) == triples(plain)
    examples = {tuple(b["targets"][r][b["segment_ids"][r] > 0]) for b in plain
                for r in range(4) if b["segment_ids"][r].any()}
    rows_with_two = 0
    for b in packed:
        for r in range(len(b["inputs"])):
            seg = b["segment_ids"][r]
            ids = [s for s in np.unique(seg) if s]
            assert ids == list(range(1, len(ids) + 1))
            rows_with_two += len(ids) > 1
            for s in ids:
                where = seg == s
                np.testing.assert_array_equal(b["positions"][r][where], np.arange(where.sum()))
                assert tuple(b["targets"][r][where]) in examples  # a whole example
    used = sum(int(b["segment_ids"][r].any()) for b in packed for r in range(4))
    assert rows_with_two > 0 and used < len(examples) == 30


def test_truncation_counted_and_no_label_error(tmp_path):
    recs = [{"prompt": "p", "completion": "c" * 50}, {"prompt": "q", "completion": "d"}]
    path = _write(tmp_path / "long.jsonl", recs)
    it = sft_data.sft_batches(path, TOK, batch_size=2, max_length=16, shuffle=False,
                              num_epochs=1, shard_index=0, shard_count=1,
                              data_dir=str(tmp_path / "tfds"))
    with pytest.warns(UserWarning, match=r"1 example\(s\) .* truncated.*longer --max-length"):
        b = next(it)
    assert it.num_truncated == 1 and b["loss_mask"][0].sum() > 0
    packed = sft_data.sft_batches(path, TOK, batch_size=2, max_length=16, shuffle=False,
                                  num_epochs=1, shard_index=0, shard_count=1, packing=True,
                                  data_dir=str(tmp_path / "tfds"))
    with pytest.warns(UserWarning, match="truncated"):
        rows = list(packed)
    assert packed.num_truncated == 1 and max(r["segment_ids"].max() for r in rows) == 1
    bad = _write(tmp_path / "nolabel.jsonl", [{"prompt": "ok", "completion": "fine"},
                                              {"prompt": "p" * 60, "completion": "c"},
                                              {"prompt": "held", "completion": "out"}])
    it = sft_data.sft_batches(bad, TOK, batch_size=1, max_length=20, shuffle=False,
                              num_epochs=1, shard_index=0, shard_count=1,
                              data_dir=str(tmp_path / "tfds"))
    with pytest.raises(sft_data.NoLabelError, match=r"nolabel.jsonl:2 \(split 'train' "
                       r"example 1\) has no labelled token after truncation.*longer "
                       r"--max-length"):
        list(it)


@pytest.mark.parametrize("lines,line,message", [
    (['{"text": "a"}', "{not json"], 2, "not valid JSON"),
    (['[1, 2]'], 1, "an array, not a JSON object"),
    (['{"foo": 1}'], 1, "none of the keys"),
    (['{"prompt": "a"}'], 1, 'no "completion" field'),
    (['{"prompt": "a", "completion": ""}'], 1, "empty completion"),
    (['{"prompt": [{"role": "user", "content": "a"}], '
      '"completion": [{"role": "user", "content": "x"}]}'], 1,
     "completion messages must be assistant turns"),
    (['{"prompt": "a", "completion": [{"role": "assistant", "content": "x"}]}'], 1,
     "both must be strings or both lists"),
    (['{"messages": [{"role": "user"}]}'], 1, 'has no "content"'),
    (['{"messages": [{"content": "x"}]}'], 1, 'has no "role"'),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], 1, "unknown role 'robot'"),
    (['{"messages": [{"role": "user", "content": 3}]}'], 1, "not a string"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], 1, "no assistant message"),
    (['{"text": "a"}', '', '{"prompt": "a", "completion": "b"}'], 3, "use one format per file"),
])
def test_malformed_lines_name_file_and_line(tmp_path, lines, line, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserDataError) as e:
        sft_data.sft_batches(path, TOK, batch_size=1, max_length=16, shard_index=0,
                             shard_count=1, data_dir=str(data_dir))
    assert str(e.value).startswith(f"{path}:{line}:") and message in str(e.value)
    assert not data_dir.exists() or not os.listdir(data_dir)


def test_tasks_splits_eval_prompts_and_resume(tmp_path):
    dd = str(tmp_path / "tfds")
    assert sft_data.eval_split("tasks/mix") == "validation"
    assert sft_data.eval_split("tasks/add", num_validation="0") is None
    prompts = {s: {TOK.decode(e["prompt_ids"]) for e in sft_data.sft_eval_prompts(
        "tasks/mix", TOK, s, 1000, data_dir=dd, **SMALL)} for s in ("train", "test")}
    assert len(prompts["test"]) == 25 and not prompts["train"] & prompts["test"]
    ev = sft_data.sft_eval_prompts("tasks/add", TOK, "validation", 3, data_dir=dd, **SMALL)
    assert len(ev) == 3 and all(e["task"] == "add" for e in ev)
    assert all(e["prompt_text"] in TOK.decode(e["prompt_ids"]) for e in ev)
    assert all(e["answer"] not in TOK.decode(e["prompt_ids"]).split("?")[-1] for e in ev)
    for packing in (False, True):
        it = sft_data.sft_batches("tasks/mix", TOK, batch_size=4, max_length=64, seed=3,
                                  packing=packing, shard_index=0, shard_count=1,
                                  data_dir=dd, **SMALL)
        next(it)
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(2)]
        again = sft_data.sft_batches("tasks/mix", TOK, batch_size=4, max_length=64, seed=3,
                                     packing=packing, shard_index=0, shard_count=1,
                                     data_dir=dd, **SMALL)
        again.set_state(state)
        for w in want:
            got = next(again)
            assert all(np.array_equal(w[k], got[k]) for k in w)
            labelled = w["targets"][w["loss_mask"] > 0]
            assert len(labelled) and set(labelled.tolist()) <= set(range(256)) | set(
                end_of_turn_ids(TOK))


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from fmzoo.train import sft_records
    path = _write(tmp_path / "ok.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    data_dir = tmp_path / "tfds"

    def boom(index, num):
        if index == 3:
            raise RuntimeError("disk full")
        return "train"
    monkeypatch.setattr(sft_records, "split_of", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        sft_data.load_sft_source(path, data_dir=str(data_dir))
    assert not (data_dir / "sft_jsonl").exists()
    monkeypatch.undo()
    assert len(sft_data.load_sft_source(path, data_dir=str(data_dir))) == 4  # + 1 held out


def _chatml_tokenizer(directory):
    """A tiny byte-level BPE tokenizer.json (no merges) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from fmzoo.models.tokenizer import HFTokenizer
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    os.makedirs(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": "<|im_end|>"}, f)
    return HFTokenizer(os.path.join(directory, "tokenizer.json"),
                       eos_id=tok.token_to_id("<|im_end|>"),
                       pad_id=tok.token_to_id("<|endoftext|>"))


def test_hf_chat_template_labels_replies_and_their_end(tmp_path):
    tok = _chatml_tokenizer(tmp_path / "tok")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "bye"}]
    path = _write(tmp_path / "chat.jsonl", [{"messages": msgs}])
    for packing in (False, True):
        b, = sft_data.sft_batches(path, tok, batch_size=1, max_length=64, shuffle=False,
                                  num_epochs=1, shard_index=0, shard_count=1, packing=packing,
                                  data_dir=str(tmp_path / "tfds"))
        labelled = b["targets"][0][b["loss_mask"][0] > 0].tolist()
        assert tok.decode(labelled, skip_special=False) == "hello<|im_end|>bye<|im_end|>"
    ev, = sft_data.sft_eval_prompts(path, tok, "train", 5, data_dir=str(tmp_path / "tfds"))
    assert tok.decode(ev["prompt_ids"], skip_special=False).endswith(
        "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    assert ev["answer"] == "bye" and ev["task"] is None and ev["prompt_text"] == "more"


def test_directory_with_named_held_out_files(tmp_path):
    d = tmp_path / "chats"
    d.mkdir()
    conv = lambda q, a: {"messages": [{"role": "user", "content": q},  # noqa: E731
                                      {"role": "assistant", "content": a}]}
    _write(d / "train.jsonl", [conv(f"q{i}", f"a{i}") for i in range(5)])
    _write(d / "my_validation.jsonl", [conv("vq", "va")])
    _write(d / "test.jsonl", [conv("tq", "ta"), conv("tq2", "ta2")])
    _write(d / ".hidden.jsonl", ["not json"])
    dd = str(tmp_path / "tfds")
    assert sft_data.dataset_format(str(d)) == "messages"
    assert sft_data.eval_split(str(d), data_dir=dd) == "validation"
    answers = {s: sorted(e["answer"] for e in sft_data.sft_eval_prompts(str(d), TOK, s, 10,
                                                                          data_dir=dd))
               for s in ("train", "validation", "test")}
    assert answers == {"train": [f"a{i}" for i in range(5)], "validation": ["va"],
                       "test": ["ta", "ta2"]}
    _write(d / "more.jsonl", [{"text": "plain"}])
    with pytest.raises(UserDataError, match="train.jsonl is in the messages format but "
                                            ".*more.jsonl is text; use one format"):
        sft_data.load_sft_source(str(d), data_dir=dd)
