"""`fmzoo chat`: a conversation with a model in the terminal.

Each user turn joins the history; the history goes through the model's chat template (the
byte tokenizer's role markers, or a Hugging Face checkpoint's jinja2 chat_template) with the
generation prompt, and the reply streams token by token until the end of the turn
(models.chat.end_of_turn_ids). The reply joins the history. When the history no longer
leaves room for max_new_tokens within the model's max_len, the oldest turns are dropped
(the system message stays), said once on stderr.

Modes: `--prompt TEXT` answers one turn and exits; with stdin not a terminal every line is
one user turn (history kept); otherwise an interactive loop with /reset and /exit.
"""

from __future__ import annotations

import sys

HELP = "chat with a model in the terminal (its chat template, streamed replies, history)"

EPILOG = """examples:
  fmzoo chat --model runs/sft-add                        (interactive; /reset, /exit)
  fmzoo chat --model ./Qwen2.5-0.5B-Instruct --system "Answer briefly." --temperature 0.7
  fmzoo chat --model runs/sft-add --prompt "12+35="      (one turn, then exit)
  printf 'hi\\nand then?\\n' | fmzoo chat --model runs/sft-add   (one turn per line)"""


def add_arguments(p):
    from fmzoo.cli import Formatter
    p.epilog, p.formatter_class = EPILOG, Formatter
    p.add_argument("--model", required=True,
                   help="training workdir, HF checkpoint dir, or preset name (random weights)")
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    p.add_argument("--prompt", default=None, help="answer this one user turn and exit")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="reply length cap (default: the checkpoint's, else 256, at most "
                        "half the model's max_len)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config.json, else 0)")
    p.add_argument("--top-k", type=int, default=None, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=None, help="1 = no nucleus cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (turn n uses seed + n)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute and parameter dtype (default: the model's own)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print each turn's templated prompt (text and token ids) to stderr")


class Session:
    """The history and the generation settings of one conversation."""

    def __init__(self, loaded, system, opts, seed: int, out, err, show_prompt=False):
        self.model, self.params, self.config, self.tokenizer = loaded
        self.system = system
        self.opts, self.seed, self.out, self.err = opts, seed, out, err
        self.show_prompt, self.warned, self.turns = show_prompt, False, 0
        self.budget = self.config.max_len + 1 - opts["max_new_tokens"]
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt_ids(self) -> list[int]:
        """The templated history with the generation prompt; the oldest turns are dropped
        while it does not fit (a ValueError when the last user turn alone does not)."""
        from fmzoo.models.chat import apply_chat_template
        while True:
            ids = apply_chat_template(self.tokenizer, self._messages(),
                                      add_generation_prompt=True)
            if len(ids) <= self.budget:
                return ids
            if len(self.history) <= 1:
                self.history = []
                raise ValueError(f"this message makes a {len(ids)}-token prompt, but the "
                                 f"model's max_len {self.config.max_len} leaves room for "
                                 f"{self.budget} prompt tokens with max_new_tokens="
                                 f"{self.opts['max_new_tokens']}; shorten it or lower "
                                 "--max-new-tokens")
            # drop the oldest user turn and the replies that follow it
            k = next((i for i, m in enumerate(self.history[1:], 1) if m["role"] == "user"),
                     len(self.history))
            self.history = self.history[k:]
            if not self.warned:
                self.warned = True
                print(f"[the conversation outgrew max_len {self.config.max_len}: dropping the "
                      "oldest turns" + (", keeping the system message" if self.system else "")
                      + "]", file=self.err)

    def turn(self, text: str) -> str:
        """Streams the reply to `text` to `out`, returns it and keeps both in the history."""
        from fmzoo.cli_generate import _Printer
        from fmzoo.infer import stream

        self.history.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        if self.show_prompt:
            from fmzoo.models.chat import apply_chat_template
            rendered = apply_chat_template(self.tokenizer, self._messages(),
                                           add_generation_prompt=True, tokenize=False)
            print(f"[prompt {rendered!r}]\n[ids {ids}]", file=self.err)
        printer, ends, reply = _Printer(self.tokenizer, self.out), set(self.opts["eos_id"]), []
        try:
            for t in stream(self.model, self.params, ids, rng=self.seed + self.turns,
                            **self.opts):
                if t in ends:
                    break
                reply.append(t)
                printer.add(t)
        except KeyboardInterrupt:  # no half reply in the history: the turn did not happen
            self.history.pop()
            raise
        printer.finish()
        self.turns += 1
        content = self.tokenizer.decode(reply)
        self.history.append({"role": "assistant", "content": content})
        return content


def _settings(args, generation, config, eos) -> dict:
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    max_new = args.max_new_tokens
    if max_new is None:  # leave the history at least half of the context
        max_new = min(generation.max_new_tokens or 256, max(1, config.max_len // 2))
    if max_new >= config.max_len:
        raise ValueError(f"--max-new-tokens {max_new} leaves no room for the conversation in "
                         f"the model's max_len {config.max_len}; ask for fewer")
    return dict(max_new_tokens=max_new, temperature=pick(args.temperature, generation.temperature),
                top_k=pick(args.top_k, generation.top_k), top_p=pick(args.top_p, generation.top_p),
                repetition_penalty=generation.repetition_penalty, eos_id=eos)


def _interactive(session, inp, out) -> None:
    print("[chat: /reset clears the history, /exit or Ctrl-D ends]", file=out)
    while True:
        try:
            if inp is sys.stdin:
                line = input("> ")
            else:  # a stream given by the caller (tests): "" is its end
                line = inp.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            session.reset()
            print("[history cleared]", file=out)
            continue
        if not line.strip():
            continue
        try:
            session.turn(line)
        except KeyboardInterrupt:  # stop this reply, keep the chat
            print("\n[interrupted]", file=out)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)


def run(args) -> int:
    import fmzoo
    from fmzoo.infer import validate
    from fmzoo.models.chat import apply_chat_template, end_of_turn_ids
    from fmzoo.models.config import LMConfig

    try:
        if args.prompt is not None and not args.prompt.strip():
            raise ValueError("--prompt needs a non-empty message")
        loaded = fmzoo.load(args.model, dtype=args.dtype)
        model, params, config, tokenizer = loaded
        if tokenizer is None:
            raise ValueError(f"{args.model!r} has no tokenizer; save one next to the "
                             "checkpoint (tokenizer.json, tokenizer.model or "
                             "fmzoo_tokenizer.json)")
        if not isinstance(config, LMConfig):
            raise ValueError(f"{args.model!r} is a seq2seq model; chat needs a decoder-only "
                             "language model (use `fmzoo generate` for seq2seq)")
        probe = [{"role": "user", "content": "hi"}]
        if args.system:
            probe.insert(0, {"role": "system", "content": args.system})
        ids = apply_chat_template(tokenizer, probe, add_generation_prompt=True)
        opts = _settings(args, loaded.generation, config, end_of_turn_ids(tokenizer))
        validate(config, [ids], **opts)  # bad flag values fail before any compilation
    except ValueError as e:  # ChatTemplateError, GenerationError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    session = Session(loaded, args.system, opts, args.seed, sys.stdout, sys.stderr,
                      args.show_prompt)
    try:
        if args.prompt is not None:
            session.turn(args.prompt)
        elif not sys.stdin.isatty():
            for line in sys.stdin:
                if line.strip():
                    session.turn(line.rstrip("\n"))
        else:
            _interactive(session, sys.stdin, sys.stdout)
    except ValueError as e:  # a turn too long for max_len
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
