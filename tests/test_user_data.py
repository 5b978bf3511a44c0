"""User data (text file, directory, JSONL) as an LM dataset through TFDS ArrayRecord + grain."""

import json
import os

import numpy as np
import pytest

from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import data, text_data

TOK = ByteTokenizer()


def _texts(src):
    return [src[i]["text"] for i in range(len(src))]


def _both_splits(path, data_dir):
    train = _texts(data.load_source(path, "train", data_dir=data_dir))
    splits = data.load_source(path, data_dir=data_dir).info.splits
    val = _texts(data.load_source(path, "validation", data_dir=data_dir)) \
        if "validation" in splits else []
    return train, val


def _variants(data_dir):
    base = os.path.join(data_dir, text_data.BUILDER_NAME)
    return sorted(os.listdir(base)) if os.path.isdir(base) else []


def test_text_file_is_chunked_losslessly_split_and_batched(tmp_path):
    lines = [f"line {i}: " + "word " * (i % 13) + "\n" + ("\n" if i % 7 == 6 else "")
             for i in range(1500)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    dd = str(tmp_path / "dd")
    docs = list(text_data.documents([str(path)]))
    assert "".join(docs) == path.read_text()  # cut at line ends only: nothing lost
    assert all(len(d) <= text_data.CHUNK_HARD + 200 for d in docs) and 2 < len(docs) < 100
    assert all(d.endswith("\n\n") for d in docs[:-1] if len(d) < text_data.CHUNK_HARD)
    train, val = _both_splits(str(path), dd)
    assert val == [docs[-1]]  # fewer than 100 documents: the last one is held out
    assert sorted(train) == sorted(docs[:-1])
    assert data.eval_split(str(path), data_dir=dd) == "validation"
    assert data.dataset_kind(str(path)) == "lm"
    it = data.lm_batches(str(path), TOK, batch_size=2, seq_len=64, data_dir=dd, shuffle=False,
                         num_epochs=1, shard_index=0, shard_count=1)
    got = [t for b in it for r, s in zip(b["inputs"], b["segment_ids"]) for t in r[s > 0]]
    src = data.load_source(str(path), data_dir=dd)
    want = [t for x in _texts(src) for t in TOK.encode(x, add_bos=True, add_eos=True)[:-1]]
    assert got == want


def test_prepared_once_and_again_after_a_change(tmp_path, monkeypatch, capfd):
    path = tmp_path / "notes.txt"
    path.write_text("version one\n" * 300)
    dd = str(tmp_path / "dd")
    assert _texts(data.load_source(str(path), data_dir=dd))
    assert f"checking {path}" in capfd.readouterr().err  # the progress bar of the first use
    [first] = _variants(dd)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("prepared again although nothing changed")
    monkeypatch.setattr(text_data, "count_documents", no_rebuild)
    assert data.load_source(str(path), data_dir=dd).info.metadata["source"] == str(path)
    monkeypatch.undo()

    path.write_text("version two\n" * 300)  # same size: the modification time tells
    os.utime(path, ns=(1, 1))
    train, val = _both_splits(str(path), dd)
    assert all("version two" in t and "one" not in t for t in train + val)
    assert _variants(dd) != [first] and len(_variants(dd)) == 1  # old variant deleted


def test_directory_recursive_suffixes_hidden_and_jsonl(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.md").write_text("# beta\n")
    (root / "sub" / "c.py").write_text("gamma = 1\n")
    (root / "sub" / "d.jsonl").write_text('{"text": "delta"}\n\n{"text": "epsilon", "id": 2}\n')
    (root / "empty.txt").write_text("")
    (root / "image.bin").write_bytes(b"\xff\xfe")  # suffix not read
    (root / ".hidden.txt").write_text("secret")
    (root / ".git" / "x.txt").write_text("secret")
    dd = str(tmp_path / "dd")
    train, val = _both_splits(str(root), dd)
    # sorted relative paths: a.txt, sub/b.md, sub/c.py, sub/d.jsonl -> the last doc is held out
    assert val == ["epsilon"]
    assert sorted(train) == sorted(["alpha\n", "# beta\n", "gamma = 1\n", "delta"])


def test_jsonl_validation_is_every_100th_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}", "meta": i}) + "\n"
                            for i in range(250)))
    train, val = _both_splits(str(path), str(tmp_path / "dd"))
    assert sorted(val) == ["record 199", "record 99"]
    assert len(train) == 248 and not set(train) & set(val)


def test_a_single_document_has_no_eval_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("just one short line\n")
    dd = str(tmp_path / "dd")
    assert data.eval_split(str(path), data_dir=dd) is None
    assert _texts(data.load_source(str(path), data_dir=dd)) == ["just one short line\n"]
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['train'\]"):
        data.load_source(str(path), "validation", data_dir=dd)


def _write(tmp_path, name, content):
    p = tmp_path / name
    if name.endswith("/"):
        p.mkdir()
        for sub, text in content.items():
            (p / sub).write_bytes(text)
    else:
        p.write_bytes(content)
    return str(p)


BAD = [
    ("empty.txt", b"", r"empty\.txt' is empty: the file holds no text"),
    ("blank.txt", b"  \n\n\t\n", "is empty: the file holds no text"),
    ("emptydir/", {"a.txt": b"", "b.md": b"\n"}, "is empty: none of its 2 files holds any text"),
    ("nodocs/", {"a.csv": b"x,y\n"}, r"holds no \*\.txt, \*\.md.*files \(searched recursively"),
    ("latin1.txt", b"ok line\ncaf\xe9 au lait\n",
     r"latin1\.txt: line 2 \(byte offset 11\) is not UTF-8 \(invalid continuation byte\); "
     "convert the file to UTF-8"),
    ("dir/", {"good.txt": b"fine\n", "bad.md": b"\x80"}, r"bad\.md: line 1 \(byte offset 0\)"),
    ("list.jsonl", b'{"text": "ok"}\n["text"]\n', r"list\.jsonl:2: a JSON array, not an object"),
    ("notext.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n',
     r"notext\.jsonl:3: no \"text\" field \(keys: \['body'\]\)"),
    ("broken.jsonl", b'{"text": "ok"\n', r"broken\.jsonl:1: not valid JSON"),
    ("array.json", b'[{"text": "a"}]', r"array\.json' is \.json; fmzoo reads JSON Lines"),
    ("number.jsonl", b'{"text": 5}\n', r"number\.jsonl:1: \"text\" is a JSON number, not a string"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_bad_user_data_one_clear_error_before_any_write(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    dd = tmp_path / "dd"
    with pytest.raises(text_data.UserDataError, match=message) as e:
        data.lm_batches(path, TOK, batch_size=2, seq_len=8, data_dir=str(dd))
    assert "\n" not in str(e.value)
    assert _variants(str(dd)) == []


def test_missing_path_and_options_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data path '\./nope\.txt' does not exist; "
                                                "--data takes a text file"):
        data.lm_batches("./nope.txt", TOK, batch_size=2, seq_len=8, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.dataset_kind(str(tmp_path / "missing.jsonl"))
    path = tmp_path / "a.txt"
    path.write_text("text\n")
    with pytest.raises(ValueError, match=r"builder options \['max_len'\] apply to the embedded"):
        data.load_source(str(path), data_dir=str(tmp_path), max_len=3)
    with pytest.raises(ValueError, match="is a lm dataset; use lm_batches"):
        data.seq2seq_batches(str(path), TOK, batch_size=2, src_len=8, tgt_len=8,
                             data_dir=str(tmp_path))


def test_concurrent_first_use_prepares_once(tmp_path):
    # the processes of a multi-host job on one machine may all see unprepared user data
    from concurrent.futures import ThreadPoolExecutor
    path = tmp_path / "a.txt"
    path.write_text("hello world\n\n" * 400)
    dd = str(tmp_path / "dd")
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: _texts(data.load_source(str(path), data_dir=dd)),
                            range(2)))
    assert got[0] == got[1] and len(_variants(dd)) == 1


def test_failure_while_writing_leaves_nothing_and_retries(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("some text\n" * 500)
    dd = str(tmp_path / "dd")
    real = text_data.documents
    calls = []

    def fail_on_second_pass(files, progress=None):
        calls.append(1)
        if len(calls) > 1:  # the checking pass succeeds, the writing pass dies midway
            yield next(real(files))
            raise OSError("disk full")
        yield from real(files, progress)
    monkeypatch.setattr(text_data, "documents", fail_on_second_pass)
    with pytest.raises(OSError, match="disk full"):
        data.load_source(str(path), data_dir=dd)
    assert _variants(dd) == []  # no incomplete.* dir, no empty config dir
    monkeypatch.undo()
    assert "".join(_texts(data.load_source(str(path), data_dir=dd))) == path.read_text()


def test_user_data_state_round_trip(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * (i % 17)}) + "\n" for i in range(40)))
    kw = dict(batch_size=2, seq_len=16, data_dir=str(tmp_path / "dd"), shard_index=0,
              shard_count=1, seed=3)
    it = data.lm_batches(str(path), TOK, **kw)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    again = data.lm_batches(str(path), TOK, **kw)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(3)]):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_resuming_after_the_files_changed_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": "y" * (i % 11)}) + "\n" for i in range(30)))
    kw = dict(batch_size=2, seq_len=16, data_dir=str(tmp_path / "dd"), shard_index=0,
              shard_count=1)
    it = data.lm_batches(str(path), TOK, **kw)
    next(it)
    state = it.get_state()
    with open(path, "a") as f:  # the user edits the corpus between the save and the resume
        f.write(json.dumps({"text": "a new document"}) + "\n")
    again = data.lm_batches(str(path), TOK, **kw)
    with pytest.raises(ValueError, match="data_version"):
        again.set_state(state)
