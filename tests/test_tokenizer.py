"""Tokenizers: bytes with special tokens, and SentencePiece / HF `tokenizers` models loaded."""

import json

import pytest

from fmzoo.models.tokenizer import (BYTE_TOKENIZER_FILE, ByteTokenizer, HFTokenizer,
                                    SentencePieceTokenizer, load_tokenizer)

TEXT = "def f(x):\n    return x  # naïve → ünïcode ✓"


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id == 257 and ids[-1] == tok.eos_id == 258
    assert max(ids[1:-1]) < 256 and len(ids) == len(TEXT.encode("utf-8")) + 2
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special=False) == "<bos>" + TEXT + "<eos>"
    chat = [tok.role("user")] + tok.encode("hi") + [tok.role("end"), tok.role("assistant")]
    assert tok.decode(chat, skip_special=False) == "<|user|>hi<|end|><|assistant|>"
    assert tok.vocab_size == 264 and tok.vocab_size > max(tok.special.values())
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tok.role("bot")


def test_byte_tokenizer_saves_as_json_and_loads(tmp_path):
    ByteTokenizer().save(str(tmp_path))
    meta = json.loads((tmp_path / BYTE_TOKENIZER_FILE).read_text())
    assert meta["kind"] == "byte"
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, ByteTokenizer) and back.encode(TEXT) == ByteTokenizer().encode(TEXT)


def test_empty_directory_has_no_tokenizer(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None


CORPUS = ["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b",
          "attention is a weighted sum of values", "the dog sleeps", "return the sum"] * 20


def test_sentencepiece_model_loads_and_round_trips(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2,
                                   pad_id=0, unk_id=3)
    tok = SentencePieceTokenizer(str(tmp_path / "sp.model"))
    ids = tok.encode("the dog returns", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2 and tok.pad_id == 0
    assert tok.decode(ids) == "the dog returns"
    tok.save(str(tmp_path / "saved"))
    back = load_tokenizer(str(tmp_path / "saved"))
    assert isinstance(back, SentencePieceTokenizer) and back.encode("the dog") == tok.encode("the dog")


def test_hf_tokenizers_model_loads_and_round_trips(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path), bos_id=1, eos_id=2)
    assert isinstance(tok, HFTokenizer) and tok.pad_id == 2  # pad falls back to eos
    ids = tok.encode("the lazy dog", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "the lazy dog"
    tok.save(str(tmp_path / "saved"))
    back = load_tokenizer(str(tmp_path / "saved"))
    assert back.encode("the lazy dog") == tok.encode("the lazy dog") and back.eos_id == 2


def test_corrupt_tokenizer_files_name_the_file(tmp_path):
    from fmzoo.models.tokenizer import TokenizerError, load_tokenizer
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match=f"^{tmp_path / 'tokenizer.json'} is not a readable "
                                             "tokenizer .*corrupt or truncated"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "fmzoo_tokenizer.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match=f"^{tmp_path / 'fmzoo_tokenizer.json'} is not valid "
                                             r"\(a JSON list, not an object\)"):
        load_tokenizer(str(tmp_path))
