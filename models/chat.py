"""Chat templates: a conversation (a list of {"role", "content"} dicts) to token ids.

The byte tokenizer's built-in template is written with its single-id role markers:

    <bos> (<|system|> | <|user|> | <|assistant|>) content-bytes <|end|> ... [<|assistant|>]

that is BOS once, then per message its role marker, the content's UTF-8 bytes and <|end|>;
`add_generation_prompt` appends the <|assistant|> marker the model answers after. The ids
are built directly, so text that looks like a marker inside a message stays plain bytes.

A tokenizer with a `chat_template` (a Hugging Face checkpoint's jinja2 template from
tokenizer_config.json; a {name: template} dict uses "default") is rendered as transformers'
`apply_chat_template` renders it: an ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, transformers' `tojson`, the variables
messages, add_generation_prompt, tools=None, documents=None and the named special-token
strings (bos_token, eos_token, pad_token, ... from tokenizer_config.json); the
text is then tokenized WITHOUT adding special tokens, so a template that writes bos_token
gives exactly one BOS.

Label masks (`encode_messages`, `encode_prompt_completion`) come from rendering prefixes:
the ids of messages[:i] with the generation prompt must be a prefix of the ids of
messages[:i+1]; the difference is the assistant turn, labelled up to and including its
end-of-turn token, and whatever the template writes after that token is not.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

ROLES = ("system", "user", "assistant")
# tokens that end an assistant turn in common templates, besides the tokenizer's EOS
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>",
                      "<|endoftext|>", "</s>")


class ChatTemplateError(ValueError):
    """A conversation or template that cannot be turned into token ids."""


def _check_messages(messages, *, byte: bool, what: str = "messages") -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"{what} must be a non-empty list of {{'role': ..., "
                                f"'content': ...}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"{what}[{i}] must be a dict with 'role' and 'content', "
                                    f"got {m!r:.80}")
        role = m["role"]
        if byte and role not in ROLES or not isinstance(role, str) or not role:
            allowed = ", ".join(ROLES) if byte else "a non-empty string"
            raise ChatTemplateError(f"{what}[{i}] has role {role!r}; the role must be {allowed}")
        if not isinstance(m["content"], str):
            raise ChatTemplateError(f"{what}[{i}] ({role}) content must be a string, got "
                                    f"{type(m['content']).__name__}; join multi-part content "
                                    "into one string")
    return [dict(m) for m in messages]


def _template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        if "default" not in template:
            raise ChatTemplateError(f"the tokenizer has chat templates {sorted(template)} but "
                                    "none named 'default'; name one 'default'")
        template = template["default"]
    return template


def _is_byte(tokenizer) -> bool:
    return getattr(tokenizer, "kind", None) == "byte"


def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    return _environment(ImmutableSandboxedEnvironment, loopcontrols).from_string(template)


def _environment(env_type, loopcontrols):
    import json
    from datetime import datetime

    import jinja2

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: no HTML escaping, json.dumps' options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set {name!r} on a namespace")

    class Namespace(jinja2.utils.Namespace):
        # as transformers: a template may not store underscore (dunder) names on a namespace
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = env_type(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["namespace"] = Namespace
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_COMPILED: dict[str, Any] = {}


def render(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (a tokenizer with a jinja2 `chat_template`)."""
    import jinja2
    template = _template_of(tokenizer)
    if template not in _COMPILED:
        try:
            _COMPILED[template] = _compile(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: "
                                    f"{e.message}); fix chat_template in "
                                    "tokenizer_config.json") from None
    specials = dict(getattr(tokenizer, "special_tokens", {}) or {})
    for name in ("bos_token", "eos_token"):
        value = getattr(tokenizer, name, None)
        if name not in specials and isinstance(value, str):
            specials[name] = value
    try:
        # tools/documents None as transformers passes them: `tools is not none` must be False
        return _COMPILED[template].render(messages=messages, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt,
                                          **specials)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


def _encode_rendered(tokenizer, text: str) -> list[int]:
    """Tokenized like transformers' `tokenizer(text, add_special_tokens=False)`: special
    token strings in the text become their ids, nothing is added."""
    if getattr(tokenizer, "kind", None) == "hf":
        return tokenizer.tok.encode(text, add_special_tokens=False).ids
    # byte / SentencePiece: split on the special strings, encode the text between
    if _is_byte(tokenizer):
        table = dict(tokenizer.special)
    else:
        table = {t: tokenizer.sp.piece_to_id(t)
                 for t in (getattr(tokenizer, "special_tokens", {}) or {}).values()}
    if not table:
        return tokenizer.encode(text)
    pattern = "(" + "|".join(map(re.escape, sorted(table, key=len, reverse=True))) + ")"
    ids: list[int] = []
    for k, part in enumerate(re.split(pattern, text)):
        ids.extend([table[part]] if k % 2 else tokenizer.encode(part) if part else [])
    return ids


def _byte_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = [tokenizer.bos_id]
    for m in messages:
        ids += [tokenizer.role(m["role"])] + tokenizer.encode(m["content"])
        ids.append(tokenizer.role("end"))
    return ids + ([tokenizer.role("assistant")] if add_generation_prompt else [])


def _no_template_error(tokenizer) -> ChatTemplateError:
    return ChatTemplateError(
        f"this {getattr(tokenizer, 'kind', type(tokenizer).__name__)} tokenizer has no chat "
        "template; give one: put a jinja2 template under \"chat_template\" in "
        "tokenizer_config.json beside the tokenizer (or set tokenizer.chat_template = "
        "'...' and save it), or use a byte-tokenizer model, whose template is built in")


def apply_chat_template(tokenizer, messages, *, add_generation_prompt: bool = False,
                        tokenize: bool = True) -> list[int] | str:
    """The conversation's token ids (or its text with tokenize=False), as transformers'
    `tokenizer.apply_chat_template(messages, add_generation_prompt=...)` gives them."""
    template = _template_of(tokenizer)
    messages = _check_messages(messages, byte=_is_byte(tokenizer) and template is None)
    if template is None:
        if not _is_byte(tokenizer):
            raise _no_template_error(tokenizer)
        ids = _byte_ids(tokenizer, messages, add_generation_prompt)
        return ids if tokenize else tokenizer.decode(ids, skip_special=False)
    text = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return _encode_rendered(tokenizer, text) if tokenize else text


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: EOS(es) plus the template's end-of-turn tokens the
    vocabulary has (byte: <|end|>; HF: e.g. <|eot_id|>, <|im_end|>). For generation's eos_id."""
    eos = tokenizer.eos_id
    ids = [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]
    if _is_byte(tokenizer):
        found = [tokenizer.role("end")]
    elif getattr(tokenizer, "kind", None) == "hf":
        found = [tokenizer.tok.token_to_id(t) for t in END_OF_TURN_TOKENS]
    else:
        unk = tokenizer.sp.unk_id()
        found = [tokenizer.sp.piece_to_id(t) for t in END_OF_TURN_TOKENS]
        found = [i for i in found if i != unk]
    for i in found:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def _is_blank(tokenizer, token: int) -> bool:
    return not tokenizer.decode([token], skip_special=False).strip()


def _label_span(tokenizer, span: Sequence[int], ends: set) -> list[bool]:
    """True up to and including the span's last end-of-turn token (or, with none, its last
    non-blank token): whatever the template writes after the turn ends is not labelled."""
    stop = max((k for k, t in enumerate(span) if t in ends), default=None)
    if stop is None:
        stop = max((k for k, t in enumerate(span) if not _is_blank(tokenizer, t)), default=-1)
    return [k <= stop for k in range(len(span))]


def _check_prefix(prefix, whole, index: int, why: str) -> None:
    if list(whole[:len(prefix)]) != list(prefix):
        at = next(k for k, (a, b) in enumerate(zip(prefix, whole)) if a != b) \
            if any(a != b for a, b in zip(prefix, whole)) else min(len(prefix), len(whole))
        raise ChatTemplateError(
            f"message {index}: {why} (they differ from token {at} on); the chat template "
            "renders earlier turns differently once later ones follow, so the assistant "
            "tokens cannot be located: use a template that renders each turn the same way")


def encode_messages(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """(ids, mask) of the whole conversation; mask is True exactly on every assistant turn's
    tokens including its end-of-turn token, False on system/user turns, headers and BOS."""
    messages = _check_messages(messages, byte=_is_byte(tokenizer)
                               and _template_of(tokenizer) is None)
    ids = apply_chat_template(tokenizer, messages)
    mask = [False] * len(ids)
    ends = set(end_of_turn_ids(tokenizer))
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = apply_chat_template(tokenizer, messages[:i], add_generation_prompt=True) \
            if i else _empty_prompt(tokenizer)
        upto = apply_chat_template(tokenizer, messages[:i + 1])
        _check_prefix(head, upto, i, f"the ids of messages[:{i}] with the generation "
                      f"prompt are not a prefix of the ids of messages[:{i + 1}]")
        _check_prefix(upto, ids, i, f"the ids of messages[:{i + 1}] are not a prefix of "
                      "the whole conversation's ids")
        mask[len(head):len(upto)] = _label_span(tokenizer, upto[len(head):], ends)
    return ids, mask


def _empty_prompt(tokenizer) -> list[int]:
    # a conversation that opens with the assistant: only what precedes the first turn (BOS)
    if _template_of(tokenizer) is None and _is_byte(tokenizer):
        return [tokenizer.bos_id, tokenizer.role("assistant")]
    return _encode_rendered(tokenizer, render(tokenizer, [], add_generation_prompt=True))


def encode_prompt_completion(tokenizer, prompt, completion) -> tuple[list[int], list[bool]]:
    """TRL's prompt-completion example: (ids, mask) with mask True on the completion's tokens
    and its end (EOS / end-of-turn). Both sides strings (bos + prompt + completion + eos) or
    both message lists (the template; the prompt rendered with the generation prompt)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ChatTemplateError("the completion is empty; an example needs a completion "
                                    "to learn")
        bos = tokenizer.bos_id is not None
        head = tokenizer.encode(prompt, add_bos=bos)
        ids = tokenizer.encode(prompt + completion, add_bos=bos, add_eos=True)
        _check_prefix(head, ids, 0, "the prompt's ids are not a prefix of prompt + "
                      "completion's ids (the tokenizer merges across the boundary); end the "
                      "prompt or start the completion with a space or newline")
        return ids, [k >= len(head) for k in range(len(ids))]
    if isinstance(prompt, str) or isinstance(completion, str):
        raise ChatTemplateError("prompt and completion must both be strings or both lists of "
                                f"messages, got {type(prompt).__name__} and "
                                f"{type(completion).__name__}")
    byte = _is_byte(tokenizer) and _template_of(tokenizer) is None
    prompt = _check_messages(prompt, byte=byte, what="prompt")
    completion = _check_messages(completion, byte=byte, what="completion")
    head = apply_chat_template(tokenizer, prompt, add_generation_prompt=True)
    ids = apply_chat_template(tokenizer, prompt + completion)
    _check_prefix(head, ids, len(prompt), "the prompt's ids with the generation prompt are "
                  "not a prefix of the whole conversation's ids")
    span = _label_span(tokenizer, ids[len(head):], set(end_of_turn_ids(tokenizer)))
    return ids, [False] * len(head) + span
