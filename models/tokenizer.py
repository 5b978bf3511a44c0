"""Tokenizers: byte-level by default; Hugging Face `tokenizers` and SentencePiece models load too.

Every tokenizer has encode(str) -> list[int], decode(list[int]) -> str, vocab_size, pad_id,
bos_id, eos_id and save(directory); `load_tokenizer(directory)` reads any of them back.
Nothing is pickled: the byte tokenizer is a small JSON file, the others their own formats.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

BYTE_TOKENIZER_FILE = "fmzoo_tokenizer.json"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class ByteTokenizer:
    """UTF-8 bytes 0..255, then pad, bos, eos and the chat role markers; vocab padded to 264."""

    kind = "byte"

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.special = {"<pad>": 256, "<bos>": 257, "<eos>": 258}
        self.special.update({t: 259 + i for i, t in enumerate(ROLE_TOKENS)})
        self.vocab_size = 264  # 263 used, rounded up to a multiple of 8

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def role(self, name: str) -> int:
        """Token id of a chat role marker: 'system', 'user', 'assistant' or 'end'."""
        key = f"<|{name}|>"
        if key not in self.special:
            raise ValueError(f"unknown role {name!r}; use one of system, user, assistant, end")
        return self.special[key]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        names = {v: k for k, v in self.special.items()}
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(names.get(i, f"<{i}>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BYTE_TOKENIZER_FILE), "w") as f:
            json.dump({"kind": "byte", "special": self.special, "vocab_size": self.vocab_size}, f)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read."""


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library."""

    kind = "hf"

    def __init__(self, path: str, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        from tokenizers import Tokenizer
        self.path = path
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise TokenizerError(f"{path} is not a readable tokenizer ({str(e)[:200]}); the "
                                 "file is corrupt or truncated: download or save it again") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # the tokenizer's own post-processor may already add BOS (Llama); do not double it
        ids = self.tok.encode(text, add_special_tokens=add_bos).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids + ([self.eos_id] if add_eos and self.eos_id is not None else [])

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, BYTE_TOKENIZER_FILE), "w") as f:
            json.dump({"kind": "hf", "bos_id": self.bos_id, "eos_id": self.eos_id,
                       "pad_id": self.pad_id}, f)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError for a bad file
            raise TokenizerError(f"{path} is not a readable SentencePiece model "
                                 f"({str(e)[:200]}); download or save it again") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        import shutil
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.path, os.path.join(directory, "tokenizer.model"))
        with open(os.path.join(directory, BYTE_TOKENIZER_FILE), "w") as f:
            json.dump({"kind": "sentencepiece"}, f)


def load_tokenizer(directory: str, *, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None):
    """The tokenizer saved in `directory`: fmzoo's own record, else tokenizer.json, else
    tokenizer.model; None when the directory holds no tokenizer."""
    meta_path = os.path.join(directory, BYTE_TOKENIZER_FILE)
    meta = {}
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{meta_path} is not valid ({e}); save the tokenizer "
                                 "again (tokenizer.save(directory))") from None
        if meta.get("kind") == "byte":
            return ByteTokenizer()
    ids = {k: v if v is not None else meta.get(k) for k, v in
           (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id))}
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(os.path.join(directory, "tokenizer.json"), **ids)
    if os.path.exists(os.path.join(directory, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(directory, "tokenizer.model"))
    return None
