"""Tokenizers: byte-level by default; Hugging Face `tokenizers` and SentencePiece models load too.

Every tokenizer has encode(str) -> list[int], decode(list[int]) -> str, vocab_size, pad_id,
bos_id, eos_id and save(directory); `load_tokenizer(directory)` reads any of them back.
Nothing is pickled: the byte tokenizer is a small JSON file, the others their own formats.
Each tokenizer also has `chat_template` (a jinja2 string, a {name: template} dict, or None:
the byte tokenizer's None means its built-in role-marker template, see models/chat.py) and
`special_tokens` ({"bos_token": "<s>", ...}, the strings a template sees); for Hugging Face
and SentencePiece files both are read from / written to tokenizer_config.json beside them.
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
    chat_template = None  # None: the built-in template on the role markers (models/chat.py)

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.special = {"<pad>": 256, "<bos>": 257, "<eos>": 258}
        self.special.update({t: 259 + i for i, t in enumerate(ROLE_TOKENS)})
        self.vocab_size = 264  # 263 used, rounded up to a multiple of 8
        self.special_tokens = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}

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
            json.dump({"kind": "byte", "special": self.special, "vocab_size": self.vocab_size,
                       **({"chat_template": self.chat_template} if self.chat_template else {})},
                      f)


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
        self.chat_template, self.special_tokens = read_chat_config(os.path.dirname(path))

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token") or _id_to_token(self.tok, self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token") or _id_to_token(self.tok, self.eos_id)

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
        write_chat_config(directory, self.chat_template, self.special_tokens)


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
        self.chat_template, self.special_tokens = read_chat_config(os.path.dirname(path))
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if name not in self.special_tokens and i is not None and i >= 0:
                self.special_tokens[name] = self.sp.id_to_piece(i)

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
        write_chat_config(directory, self.chat_template, self.special_tokens)


# the named special tokens transformers passes to a chat template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


def _id_to_token(tok, i) -> str | None:
    return tok.id_to_token(i) if isinstance(i, int) else None


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a token as a string or as an AddedToken dict
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid ({e}); download or save it again") from None
    return data


def read_chat_config(directory: str) -> tuple:
    """(chat_template, special_tokens) from tokenizer_config.json (and the chat_template.jinja
    that newer transformers writes instead) in `directory`; (None, {}) when absent."""
    config, specials = {}, {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            data = _read_json_object(path)
            config = data if name == "tokenizer_config.json" else config
            specials.update({k: t for k in SPECIAL_TOKEN_NAMES
                             if (t := _token_text(data.get(k))) is not None})
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template
                    if isinstance(t, dict) and "name" in t and "template" in t}
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    return template, specials


def write_chat_config(directory: str, template, special_tokens: dict) -> None:
    """Adds chat_template and the special-token strings to tokenizer_config.json in
    `directory`, keeping its other keys; nothing is written when there is nothing to add."""
    if not template and not special_tokens:
        return
    path = os.path.join(directory, "tokenizer_config.json")
    data = _read_json_object(path) if os.path.isfile(path) else {}
    data.update(special_tokens)
    if template:
        data["chat_template"] = (template if isinstance(template, str) else
                                 [{"name": k, "template": v} for k, v in template.items()])
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


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
            tok = ByteTokenizer()
            if meta.get("chat_template"):
                tok.chat_template = meta["chat_template"]
            return tok
    ids = {k: v if v is not None else meta.get(k) for k, v in
           (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id))}
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(os.path.join(directory, "tokenizer.json"), **ids)
    if os.path.exists(os.path.join(directory, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(directory, "tokenizer.model"))
    return None
