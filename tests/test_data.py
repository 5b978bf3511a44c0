"""Input pipeline: offline TFDS builders, packing/padding invariants, iterator state, shards."""

import json
import os
import platform
import sys
import warnings

import numpy as np
import pytest

from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import batching, data, datasets

TOK = ByteTokenizer()
SMALL = dict(min_len=3, max_len=9, num_train=60, num_test=12)


def _docs(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(chr(97 + c) for c in rng.integers(0, 26, size=int(rng.integers(0, 40))))
            for _ in range(n)]


def _all(it):
    return list(it)


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- builders


def test_algorithmic_tasks_build_offline_and_are_correct(tmp_path):
    rules = {"copy": lambda s: s, "reverse": lambda s: s[::-1],
             "sort": lambda s: "".join(sorted(s)),
             "addition": lambda s: str(sum(int(x) for x in s.split("+")))}
    for task, rule in rules.items():
        for split in ("train", "test"):
            src = data.load_source(f"algorithmic/{task}", split, data_dir=str(tmp_path), **SMALL)
            assert len(src) == SMALL["num_train" if split == "train" else "num_test"]
            for i in range(len(src)):
                ex = src[i]
                assert ex["target"] == rule(ex["source"]), (task, ex)
                parts = ex["source"].split("+") if task == "addition" else [ex["source"]]
                assert all(3 <= len(p) <= 9 for p in parts), ex
    train = {data.load_source("algorithmic/reverse", "train", data_dir=str(tmp_path),
                              **SMALL)[i]["source"] for i in range(60)}
    test = data.load_source("algorithmic/reverse", "test", data_dir=str(tmp_path), **SMALL)
    assert not train & {test[i]["source"] for i in range(len(test))}
    assert "tensorflow" not in sys.modules  # the whole path runs without TensorFlow


def test_default_config_reads_back_through_tfds_data_source(tmp_path):
    import tensorflow_datasets as tfds
    src = data.load_source("algorithmic/reverse", "test", data_dir=str(tmp_path))
    direct = tfds.data_source("algorithmic/reverse", split="test", data_dir=str(tmp_path))
    assert len(direct) == len(src) == 500
    assert direct[7]["source"].decode() == src[7]["source"]
    assert (tmp_path / "algorithmic" / "reverse" / "1.0.0").is_dir()
    assert list(tmp_path.glob("algorithmic/reverse/1.0.0/*.array_record-*"))


def test_builds_are_deterministic_and_seeded(tmp_path):
    a = data.load_source("algorithmic/sort", data_dir=str(tmp_path / "a"), **SMALL)
    b = data.load_source("algorithmic/sort", data_dir=str(tmp_path / "b"), **SMALL)
    c = data.load_source("algorithmic/sort", data_dir=str(tmp_path / "a"), seed=1, **SMALL)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert [a[i] for i in range(len(a))] != [c[i] for i in range(len(c))]


def test_failed_build_leaves_nothing_and_retries(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(datasets, "algorithmic_examples", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        data.load_source("algorithmic/copy", data_dir=str(tmp_path), **SMALL)
    assert not list(tmp_path.glob("algorithmic/copy*/*"))  # no version dir, no incomplete.*
    assert not datasets.embedded_builder("algorithmic/copy", str(tmp_path), **SMALL).is_prepared()
    monkeypatch.undo()
    assert len(data.load_source("algorithmic/copy", data_dir=str(tmp_path), **SMALL)) == 60


def test_concurrent_first_use_builds_once(tmp_path):
    # two processes of a multi-host job on one machine may both see an unbuilt dataset
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: data.load_source("algorithmic/sort", "test",
                                                       data_dir=str(tmp_path), **SMALL),
                            range(2)))
    assert [got[0][i] for i in range(12)] == [got[1][i] for i in range(12)]
    assert len(list(tmp_path.glob("algorithmic/sort_*/1.0.0"))) == 1


def test_python_docs_corpus_and_metadata(tmp_path):
    train = data.load_source("python_docs", "train", data_dir=str(tmp_path), max_files=25)
    val = data.load_source("python_docs", "validation", data_dir=str(tmp_path), max_files=25)
    assert len(train) > 10 and len(val) >= 1
    assert train.info.metadata["python_version"] == platform.python_version()
    assert platform.python_version().replace(".", "_") in train.info.config_name
    on_disk = json.loads(next(tmp_path.glob("python_docs/*/1.0.0/metadata.json")).read_text())
    assert on_disk["python_version"] == platform.python_version()
    assert not ({train[i]["module"] for i in range(len(train))}
                & {val[i]["module"] for i in range(len(val))})
    assert all(train[i]["text"].strip() for i in range(len(train)))
    assert data.dataset_kind("python_docs") == "lm"


def test_registry_answers_without_building_and_matches_the_builders(tmp_path):
    empty = tmp_path / "unused"
    for name, spec in data.REGISTRY.items():
        assert data.dataset_kind(name) == spec.kind
        assert data.eval_split(name, data_dir=str(empty)) == spec.eval_split
    assert not empty.exists()  # the registry answered; nothing was built
    # what the registry says is what the builders do
    built = data.load_source("python_docs", data_dir=str(tmp_path), max_files=21)
    assert set(built.info.splits.keys()) == {"train", data.REGISTRY["python_docs"].eval_split}
    assert data.default_options("python_docs") == {"max_files": None}
    for task in datasets.TASKS:
        name = f"algorithmic/{task}"
        src = data.load_source(name, data_dir=str(tmp_path), **SMALL)
        assert set(src.info.splits.keys()) == {"train", data.eval_split(name)}
        assert src.kind == data.dataset_kind(name) == "seq2seq"
        assert data.default_options(name) == datasets.check_algorithmic_knobs(task, {})
    assert data.EXAMPLES == {"lm": "python_docs", "seq2seq": "algorithmic/reverse"}
    assert all(data.REGISTRY[n].kind == k for k, n in data.EXAMPLES.items())
    assert data.default_options("tiny_shakespeare") == {}
    with pytest.raises(ValueError, match="Did you mean: algorithmic/sort"):
        data.eval_split("algorithmic/sorted")


def test_names_paths_and_catalog_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "python_docs").mkdir()  # an embedded name wins over a same-named folder
    (tmp_path / "mine").mkdir()
    assert data.user_data_path("python_docs") is None
    assert data.user_data_path("mine") == "mine"
    assert data.user_data_path("wmt14_translate/de-en") is None
    for looks_like_a_path in ("./x", "~/nope/x", "corpus.txt", "d/e.jsonl"):
        with pytest.raises(FileNotFoundError, match="does not exist; --data takes a text file"):
            data.user_data_path(looks_like_a_path)
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=2):
        assert data.eval_split("tiny_shakespeare", data_dir=str(tmp_path)) == "validation"


def test_module_text_keeps_docstrings_and_comments_in_order():
    src = (b'#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n"""Module doc."""\n'
           b'# a comment\n# continued\nx = "not a doc"  # trailing note\n'
           b'# ----------\ndef f():\n    """Function doc.\n\n    More."""\n')
    assert datasets.module_text(src) == (
        "Module doc.\n\na comment\ncontinued\ntrailing note\n\nFunction doc.\n\nMore.")


# ----------------------------------------------------------------------------- LM batches


def _lm(docs, **kw):
    args = dict(batch_size=4, seq_len=16, seed=3, shard_index=0, shard_count=1)
    return data.lm_batches(docs, TOK, **{**args, **kw})


def test_packing_invariants_and_no_token_lost():
    docs = _docs()
    batches = _all(_lm(docs, num_epochs=1, shuffle=False))
    ins, tgts = [], []
    for b in batches:
        assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
            "inputs": (np.int32, (4, 16)), "targets": (np.int32, (4, 16)),
            "loss_mask": (np.float32, (4, 16)), "positions": (np.int32, (4, 16)),
            "segment_ids": (np.int32, (4, 16))}
        for row in range(4):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            np.testing.assert_array_equal(b["loss_mask"][row], seg > 0)
            real = seg > 0
            assert real[:real.sum()].all()  # padding only at the end of a row
            assert np.all(b["inputs"][row][~real] == TOK.pad_id)
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at 0
                # within a segment the next input is the current target: no cross-doc target
                np.testing.assert_array_equal(b["inputs"][row][idx[1:]],
                                              b["targets"][row][idx[:-1]])
                ins += list(b["inputs"][row][idx])
                tgts += list(b["targets"][row][idx])
    encoded = [TOK.encode(d, add_bos=True, add_eos=True) for d in docs]
    assert ins == [t for e in encoded for t in e[:-1]]
    assert tgts == [t for e in encoded for t in e[1:]]


def test_padded_mode_truncates_with_one_warning():
    docs = ["a" * 40, "b" * 5, "c" * 30, "d" * 3, "e" * 50]  # 3 docs longer than 17 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = _lm(docs, pack=False, batch_size=2, num_epochs=1, shuffle=False)
        batches = _all(it)
    msgs = [w for w in caught if "truncated" in str(w.message)]
    assert len(msgs) == 1 and it.num_truncated == 3
    assert len(batches) == 3 and batches[-1]["segment_ids"][1].sum() == 0  # padded last row
    row = batches[0]
    np.testing.assert_array_equal(row["inputs"][0], TOK.encode("a" * 40, add_bos=True)[:16])
    np.testing.assert_array_equal(row["targets"][0], TOK.encode("a" * 40)[:16])
    np.testing.assert_array_equal(row["segment_ids"][1], [1] * 6 + [0] * 10)
    np.testing.assert_array_equal(row["targets"][1][:6], TOK.encode("b" * 5, add_eos=True))


def test_same_seed_same_batches_and_epochs_reshuffle():
    docs = _docs()
    a = [next(it) for it in [_lm(docs, pack=False, seq_len=48)] for _ in range(12)]
    b = [next(it) for it in [_lm(docs, pack=False, seq_len=48)] for _ in range(12)]
    _same(a, b)
    c = [next(it) for it in [_lm(docs, pack=False, seq_len=48, seed=4)] for _ in range(12)]
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
    # one document per row: rows 0..22 are epoch 1, rows 23..45 epoch 2
    rows = [TOK.decode(r[m > 0]) for x in a for r, m in zip(x["inputs"], x["segment_ids"])]
    epoch1, epoch2 = rows[:23], rows[23:46]
    assert sorted(epoch1) == sorted(docs) == sorted(epoch2)
    assert epoch1 != epoch2 and epoch1 != docs


@pytest.mark.filterwarnings("ignore:.*truncated")
@pytest.mark.parametrize("pack", [True, False])
def test_lm_state_round_trip_through_json(tmp_path, pack):
    kw = dict(batch_size=4, seq_len=24, pack=pack, data_dir=str(tmp_path), max_files=6,
              shard_index=0, shard_count=1)
    it = data.lm_batches("python_docs", TOK, **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    again = data.lm_batches("python_docs", TOK, **kw)
    again.set_state(state)
    _same(expected, [next(again) for _ in range(6)])
    other = data.lm_batches("python_docs", TOK, **{**kw, "seq_len": 32})
    with pytest.raises(ValueError, match="seq_len=24 vs 32"):
        other.set_state(state)


# ----------------------------------------------------------------------------- seq2seq


def test_seq2seq_batches_format_and_state(tmp_path):
    kw = dict(batch_size=4, src_len=10, tgt_len=11, data_dir=str(tmp_path), shard_index=0,
              shard_count=1, **SMALL)
    it = data.seq2seq_batches("algorithmic/reverse", TOK, **kw)
    b = next(it)
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
        "src": (np.int32, (4, 10)), "src_mask": (bool, (4, 10)), "tgt_in": (np.int32, (4, 11)),
        "tgt_out": (np.int32, (4, 11)), "tgt_mask": (bool, (4, 11))}
    for r in range(4):
        n, m = b["src_mask"][r].sum(), b["tgt_mask"][r].sum()
        src = TOK.decode(b["src"][r][:n])
        assert TOK.decode(b["tgt_out"][r][:m - 1]) == src[::-1]
        assert b["tgt_in"][r][0] == TOK.bos_id and b["tgt_out"][r][m - 1] == TOK.eos_id
        np.testing.assert_array_equal(b["tgt_in"][r][1:m], b["tgt_out"][r][:m - 1])
        assert np.all(b["src"][r][n:] == TOK.pad_id) and np.all(b["tgt_out"][r][m:] == TOK.pad_id)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    again = data.seq2seq_batches("algorithmic/reverse", TOK, **kw)
    again.set_state(state)
    _same(expected, [next(again) for _ in range(4)])


def test_shards_are_disjoint_and_complete():
    pairs = [(f"s{i}", f"t{i}") for i in range(22)]
    seen = []
    for shard in range(3):
        it = data.seq2seq_batches(pairs, TOK, batch_size=6, src_len=4, tgt_len=5,
                                  num_epochs=1, shard_index=shard, shard_count=3)
        assert it.local_batch_size == 2
        for b in it:
            assert b["src"].shape == (2, 4)
            seen += [TOK.decode(r[m]) for r, m in zip(b["src"], b["src_mask"]) if m.any()]
    assert sorted(seen) == sorted(s for s, _ in pairs)
    default = data.lm_batches(["x"], TOK, batch_size=2, seq_len=4)
    assert (default.spec["shard_index"], default.spec["shard_count"]) == (0, 1)  # from jax


# ----------------------------------------------------------------------------- errors, catalog


def test_unknown_dataset_lists_embedded_and_close_names(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)Did you mean: python_docs.*algorithmic/copy"):
        data.load_source("python_doc", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Did you mean: algorithmic/reverse"):
        data.dataset_kind("algorithmic/revers")
    with pytest.raises(ValueError, match="Did you mean: tiny_shakespeare"):
        data.load_source("tiny_shakespear", data_dir=str(tmp_path))


def test_bad_options_are_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="min_len <= max_len"):
        data.load_source("algorithmic/copy", data_dir=str(tmp_path), min_len=5, max_len=2)
    with pytest.raises(ValueError, match="unknown option"):
        data.load_source("algorithmic/copy", data_dir=str(tmp_path), length=5)
    with pytest.raises(ValueError, match="multiple of shard_count=3"):
        data.lm_batches(["a", "b", "c"], TOK, batch_size=4, seq_len=8, shard_index=0,
                        shard_count=3)
    with pytest.raises(ValueError, match="is a seq2seq dataset; use seq2seq_batches"):
        data.lm_batches("algorithmic/copy", TOK, batch_size=2, seq_len=8,
                        data_dir=str(tmp_path), **SMALL)
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['test'"):
        data.load_source("algorithmic/copy", "validation", data_dir=str(tmp_path), **SMALL)
    assert not list(tmp_path.glob("algorithmic/copy_len5-2*"))


def test_unprepared_catalog_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_source("tiny_shakespeare", data_dir=str(tmp_path))
    msg = str(e.value)
    assert f"tfds build tiny_shakespeare --data_dir={tmp_path} --file_format=array_record" in msg
    assert "TensorFlow" in msg and "python_docs" in msg
    assert data.dataset_kind("wmt14_translate/de-en", data_dir=str(tmp_path)) == "seq2seq"
    assert data.dataset_kind("lm1b", data_dir=str(tmp_path)) == "lm"


def test_catalog_datasets_through_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=6):
        lm = data.lm_batches("tiny_shakespeare", TOK, batch_size=2, seq_len=8, num_epochs=1,
                             data_dir=str(tmp_path), shard_index=0, shard_count=1,
                             shuffle=False)
        texts = [data.load_source("tiny_shakespeare", data_dir=str(tmp_path))[i]["text"]
                 for i in range(6)]
        got = [t for b in lm for r, s in zip(b["inputs"], b["segment_ids"]) for t in r[s > 0]]
        assert got == [t for x in texts for t in TOK.encode(x, add_bos=True, add_eos=True)[:-1]]
        s2s = data.seq2seq_batches("wmt14_translate/de-en", TOK, batch_size=2, src_len=64,
                                   tgt_len=64, data_dir=str(tmp_path), shard_index=0,
                                   shard_count=1, shuffle=False)
        first = data.load_source("wmt14_translate/de-en", data_dir=str(tmp_path))[0]
        b = next(s2s)
        assert TOK.decode(b["src"][0][b["src_mask"][0]]) == first["de"]
        assert TOK.decode(b["tgt_out"][0][b["tgt_mask"][0]]) == first["en"]
    assert "tensorflow" not in sys.modules


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FMZOO_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("FMZOO_DATA_DIR")
    assert data.default_data_dir() == os.path.expanduser("~/.cache/fmzoo/tensorflow_datasets")
    assert batching.STATE_FORMAT == data.lm_batches(["ab"], TOK, batch_size=1, seq_len=4,
                                                    ).get_state()["format"]
