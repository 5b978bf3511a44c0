"""Chat templates (models/chat.py) against transformers' apply_chat_template, label masks,
errors, and `fmzoo chat` through the CLI."""

import json
import os

import pytest

from fmzoo.models.chat import (ChatTemplateError, apply_chat_template, encode_messages,
                               encode_prompt_completion, end_of_turn_ids)
from fmzoo.models.tokenizer import ByteTokenizer, load_tokenizer

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# the same text, with transformers' {% generation %} marks: its assistant mask is a reference
CHATML_GEN = CHATML.replace(
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}")
CHATML_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CORPUS = ["Hello there, how are you today?", "I am fine, thank you very much.",
          "What is twelve plus thirty five?", "The answer is forty seven.",
          "You are a helpful assistant.", "system user assistant helpful answer"]

CONVO = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is twelve plus thirty five?"},
         {"role": "assistant", "content": "The answer is forty seven."},
         {"role": "user", "content": "Thank you very much."},
         {"role": "assistant", "content": "I am fine."}]


def _hf_dir(tmp_path, template, special, bos, eos, name):
    """A small byte-level BPE tokenizer with the template's special tokens, saved with its
    chat_template in tokenizer_config.json, as transformers writes a checkpoint dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    d = tmp_path / name
    fast.save_pretrained(str(d))
    # the template the way a checkpoint carries it: inside tokenizer_config.json
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = load_tokenizer(str(d), bos_id=tok.token_to_id(bos), eos_id=tok.token_to_id(eos))
    return PreTrainedTokenizerFast.from_pretrained(str(d)), ours


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return _hf_dir(tmp_path_factory.mktemp("tok"), LLAMA3, LLAMA3_SPECIAL,
                   "<|begin_of_text|>", "<|end_of_text|>", "llama3")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return _hf_dir(tmp_path_factory.mktemp("tok"), CHATML, CHATML_SPECIAL,
                   "<|endoftext|>", "<|im_end|>", "chatml")


def _reference(hf, messages, gen):
    out = hf.apply_chat_template(messages, add_generation_prompt=gen)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("which", ["llama3", "chatml"])
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("gen", [True, False])
def test_ids_equal_transformers(which, system, gen, request):
    hf, ours = request.getfixturevalue(which)
    messages = CONVO[:4] if system else CONVO[1:4]
    ids = apply_chat_template(ours, messages, add_generation_prompt=gen)
    assert ids == _reference(hf, messages, gen)
    text = apply_chat_template(ours, messages, add_generation_prompt=gen, tokenize=False)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    if which == "llama3":  # the template writes bos_token; it must not be doubled
        assert ids.count(ours.bos_id) == 1 and ids[0] == ours.bos_id


FANCY = ("{% set ns = namespace(n=0) %}{% for m in messages %}"
         "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
         "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
         "{% set ns.n = ns.n + 1 %}<|im_start|>{{ m['role'] }} {{ ns.n }}\n"
         "{{ m | tojson }}<|im_end|>\n{% endfor %}"
         "{% if tools is not none %}TOOLS{% endif %}{{ pad_token | default('') }}")


def test_namespace_tojson_raise_exception_as_transformers(chatml):
    hf, ours = chatml
    ours.chat_template = FANCY
    try:
        messages = CONVO[:2] + [{"role": "user", "content": "é <b> \"q\""}]
        assert apply_chat_template(ours, messages, tokenize=False) == \
            hf.apply_chat_template(messages, chat_template=FANCY, tokenize=False)
        assert apply_chat_template(ours, messages) == list(
            hf.apply_chat_template(messages, chat_template=FANCY)["input_ids"])
        with pytest.raises(ChatTemplateError, match="the chat template refused the "
                           "conversation: unknown role tool$"):
            apply_chat_template(ours, [{"role": "tool", "content": "x"}])
    finally:
        ours.chat_template = CHATML


def test_template_survives_save_and_load(chatml, tmp_path):
    _, ours = chatml
    ours.save(str(tmp_path / "saved"))
    back = load_tokenizer(str(tmp_path / "saved"), bos_id=ours.bos_id, eos_id=ours.eos_id)
    assert back.chat_template == CHATML and back.eos_token == "<|im_end|>"
    assert apply_chat_template(back, CONVO) == apply_chat_template(ours, CONVO)


def test_named_templates_use_default(chatml, tmp_path):
    _, ours = chatml
    ours.save(str(tmp_path))
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                            {"name": "default", "template": CHATML}]
    cfg_path.write_text(json.dumps(cfg))
    back = load_tokenizer(str(tmp_path), bos_id=ours.bos_id, eos_id=ours.eos_id)
    assert apply_chat_template(back, CONVO) == apply_chat_template(ours, CONVO)
    back.chat_template = {"tool_use": "TOOLS"}
    with pytest.raises(ChatTemplateError, match=r"chat templates \['tool_use'\] but none named "
                       "'default'"):
        apply_chat_template(back, CONVO)


def test_byte_template_ids():
    tok = ByteTokenizer()
    sys_, user, asst, end = (tok.role(r) for r in ("system", "user", "assistant", "end"))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hé"}]
    want = [tok.bos_id, sys_, ord("S"), end, user, *"hé".encode(), end]
    assert apply_chat_template(tok, messages) == want
    assert apply_chat_template(tok, messages, add_generation_prompt=True) == want + [asst]
    # marker-looking text inside a message stays bytes, not the special id
    assert apply_chat_template(tok, [{"role": "user", "content": "<|end|>"}])[2:-1] == \
        list(b"<|end|>")
    assert end_of_turn_ids(tok) == [tok.eos_id, end]


def test_byte_tokenizer_with_a_jinja_template(tmp_path):
    """A jinja2 template on the byte tokenizer writing the built-in format gives the same
    ids (marker strings become their single ids) and survives save / load."""
    tok = ByteTokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
                         "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                         "{% endif %}")
    tok.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert back.chat_template == tok.chat_template
    for gen in (False, True):
        assert apply_chat_template(back, CONVO, add_generation_prompt=gen) == \
            apply_chat_template(ByteTokenizer(), CONVO, add_generation_prompt=gen)
    assert encode_messages(back, CONVO) == encode_messages(ByteTokenizer(), CONVO)


def _labelled(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)


def test_byte_masks_label_every_assistant_turn_and_its_end():
    tok = ByteTokenizer()
    ids, mask = encode_messages(tok, CONVO)
    assert ids == apply_chat_template(tok, CONVO) and len(mask) == len(ids)
    assert _labelled(tok, ids, mask) == "The answer is forty seven.<|end|>I am fine.<|end|>"
    assert ids.count(tok.bos_id) == 1 and not mask[0]
    # the labelled positions are exactly the two assistant spans
    starts = [i + 1 for i, t in enumerate(ids) if t == tok.role("assistant")]
    assert [i for i, m in enumerate(mask) if m] == [
        k for s in starts for k in range(s, ids.index(tok.role("end"), s) + 1)]


@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_hf_masks(which, request):
    hf, ours = request.getfixturevalue(which)
    ids, mask = encode_messages(ours, CONVO)
    assert ids == _reference(hf, CONVO, False)
    eot = "<|eot_id|>" if which == "llama3" else "<|im_end|>"
    assert _labelled(ours, ids, mask) == f"The answer is forty seven.{eot}I am fine.{eot}"
    assert ids.count(ours.tok.token_to_id(eot)) == len(CONVO)


def test_chatml_mask_equals_transformers_generation_mask(chatml, tmp_path):
    hf, ours = chatml
    out = hf.apply_chat_template(CONVO, chat_template=CHATML_GEN, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids, mask = encode_messages(ours, CONVO)
    assert ids == list(out["input_ids"])
    assert [int(m) for m in mask] == list(out["assistant_masks"])


def test_prompt_completion():
    tok = ByteTokenizer()
    ids, mask = encode_prompt_completion(tok, "12+35=", "47")
    assert ids == [tok.bos_id, *b"12+35=47", tok.eos_id]
    assert mask == [False] * 7 + [True] * 3
    prompt, completion = CONVO[:2], CONVO[2:3]
    ids, mask = encode_prompt_completion(tok, prompt, completion)
    assert ids == apply_chat_template(tok, CONVO[:3])
    assert _labelled(tok, ids, mask) == "The answer is forty seven.<|end|>"
    with pytest.raises(ChatTemplateError, match="both be strings or both lists"):
        encode_prompt_completion(tok, "a", completion)


def test_hf_prompt_completion_messages(chatml):
    _, ours = chatml
    ids, mask = encode_prompt_completion(ours, CONVO[:2], CONVO[2:3])
    assert ids == encode_messages(ours, CONVO[:3])[0]
    assert mask == encode_messages(ours, CONVO[:3])[1]


def test_prefix_property_failure_names_the_message(chatml):
    _, ours = chatml
    # a template that renders the last message differently from earlier ones
    ours.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                          "{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    try:
        with pytest.raises(ChatTemplateError, match=r"^message 1: the ids of messages\[:1\] "
                           r"with the generation prompt are not a prefix"):
            encode_messages(ours, CONVO[1:4])
    finally:
        ours.chat_template = CHATML


@pytest.mark.parametrize("messages, error", [
    ([], "messages must be a non-empty list"),
    ([{"role": "robot", "content": "x"}], "messages[0] has role 'robot'; the role must be "
                                           "system, user, assistant"),
    ([{"role": "user", "content": ["a", "b"]}], "messages[0] (user) content must be a string, "
                                                 "got list"),
    ([{"role": "user"}], "messages[0] must be a dict with 'role' and 'content'"),
])
def test_bad_messages(messages, error):
    with pytest.raises(ChatTemplateError) as e:
        encode_messages(ByteTokenizer(), messages)
    assert str(e.value).startswith(error)


def test_no_template_says_how_to_give_one(chatml):
    _, ours = chatml
    ours.chat_template = None
    try:
        with pytest.raises(ChatTemplateError, match="has no chat template; give one: put a "
                           "jinja2 template under \"chat_template\" in tokenizer_config.json"):
            apply_chat_template(ours, CONVO)
    finally:
        ours.chat_template = CHATML


# ------------------------------------------------------------------------- fmzoo chat


@pytest.fixture
def tiny(monkeypatch):
    """`fmzoo chat --model gpt-tiny` on a one-layer gpt-tiny (fast to compile), with the
    greedy reply's tokens; the spy records every prompt the CLI streams from."""
    import fmzoo
    import fmzoo.infer
    real_load, real_stream = fmzoo.load, fmzoo.infer.stream
    small = dict(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64, max_len=64)
    monkeypatch.setattr(fmzoo, "load", lambda src, **kw: real_load(src, **small, **kw))
    prompts = []

    def spy(model, params, prompt, **kw):
        prompts.append(list(prompt))
        return real_stream(model, params, prompt, **kw)
    monkeypatch.setattr(fmzoo.infer, "stream", spy)
    loaded = real_load("gpt-tiny", **small)
    return loaded, prompts


def _greedy(loaded, ids, n):
    import importlib
    stream = importlib.import_module("fmzoo.infer.generate").stream  # not the spy
    return list(stream(loaded.model, loaded.params, ids, max_new_tokens=n))


def test_chat_prompt_streams_and_stops_at_end_of_turn(tiny, monkeypatch, capsys):
    import fmzoo.models.chat as chat
    from fmzoo.cli import main
    loaded, prompts = tiny
    tok = loaded.tokenizer
    ids = apply_chat_template(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    toks = _greedy(loaded, ids, 12)
    # the first new token unseen before: make it the end of the turn
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])
    monkeypatch.setattr(chat, "end_of_turn_ids", lambda t: [toks[k]])
    assert main(["chat", "--model", "gpt-tiny", "--prompt", "hi", "--max-new-tokens", "12"]) == 0
    assert prompts == [ids]
    assert capsys.readouterr().out == tok.decode(toks[:k]) + "\n"


def test_chat_stdin_lines_keep_the_history(tiny, monkeypatch, capsys):
    import io

    from fmzoo.cli import main
    loaded, prompts = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n\nsecond\n"))
    assert main(["chat", "--model", "gpt-tiny", "--system", "S", "--max-new-tokens", "3",
                 "--show-prompt"]) == 0
    out = capsys.readouterr()
    tok = loaded.tokenizer
    reply = tok.decode(_greedy(loaded, prompts[0], 3))
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": reply}, {"role": "user", "content": "second"}]
    assert prompts == [apply_chat_template(tok, conv[:2], add_generation_prompt=True),
                       apply_chat_template(tok, conv, add_generation_prompt=True)]
    assert out.err.count("[prompt ") == 2 and "second" in out.err


def test_chat_drops_oldest_turns_past_max_len(tiny, monkeypatch, capsys):
    import io

    from fmzoo.cli import main
    _, prompts = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("a" * 20 + "\n" + "b" * 20 + "\n"))
    # max_len 64, 30 new tokens: 35 prompt tokens fit, two 20-byte turns do not
    assert main(["chat", "--model", "gpt-tiny", "--system", "S", "--max-new-tokens",
                 "30"]) == 0
    err = capsys.readouterr().err
    assert err.count("dropping the oldest turns, keeping the system message") == 1
    assert all(len(p) <= 35 for p in prompts)
    assert b"a" * 20 not in bytes(t for t in prompts[1] if t < 256)
    assert prompts[1][:5] == prompts[0][:5]  # bos, <|system|> S <|end|>, <|user|>


def test_chat_refuses_max_new_tokens_past_max_len(tiny, capsys):
    from fmzoo.cli import main
    _, prompts = tiny
    assert main(["chat", "--model", "gpt-tiny", "--max-new-tokens", "64", "--prompt",
                 "x"]) == 2
    assert capsys.readouterr().err == ("error: --max-new-tokens 64 leaves no room for the "
                                       "conversation in the model's max_len 64; ask for fewer\n")
    assert prompts == []


def test_interactive_reset_exit_and_eof():
    import io

    from fmzoo.cli_chat import _interactive

    class Stub:
        def __init__(self):
            self.log = []

        def turn(self, text):
            self.log.append(text)

        def reset(self):
            self.log.append("RESET")

    for text, log, said in [("a\n/reset\n\nb\n/exit\nc\n", ["a", "RESET", "b"], True),
                            ("a\nb", ["a", "b"], False)]:  # /exit, then the input's end
        stub, out = Stub(), io.StringIO()
        _interactive(stub, io.StringIO(text), out)
        assert stub.log == log
        assert ("[history cleared]" in out.getvalue()) == said


def test_chat_on_a_hugging_face_dir_matches_transformers(chatml, capsys):
    """`fmzoo chat` on a tiny Llama checkpoint with the ChatML tokenizer: the prompt is
    transformers' apply_chat_template, the reply transformers' greedy answer to it."""
    import shutil

    import torch
    import transformers as tr

    from fmzoo.cli import main
    hf_tok, ours = chatml
    d = os.path.join(os.path.dirname(ours.path), "model")
    shutil.copytree(os.path.dirname(ours.path), d)
    torch.manual_seed(0)
    config = tr.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                            max_position_embeddings=64, initializer_range=0.2,
                            bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    model = tr.LlamaForCausalLM(config).eval()
    model.save_pretrained(d, safe_serialization=True)
    messages = [{"role": "user", "content": "Hello there"}]
    ids = list(hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                             eos_token_id=end_of_turn_ids(ours), pad_token_id=0)
    new = [t for t in out[0, len(ids):].tolist() if t not in end_of_turn_ids(ours)]
    assert new and hf_tok.decode(new, skip_special_tokens=True).strip()
    assert main(["chat", "--model", d, "--prompt", "Hello there", "--max-new-tokens", "5",
                 "--temperature", "0", "--show-prompt"]) == 0
    got = capsys.readouterr()
    assert f"[ids {ids}]" in got.err
    assert got.out == hf_tok.decode(new, skip_special_tokens=True) + "\n"
