"""`fmzoo generate`: stream text from a preset, a training workdir or a Hugging Face dir.

Sampling (num_beams 1) streams: a jitted prefill, then a Python loop over a jitted decode
step printing each decoded increment. Beam search cannot know its answer before it ends,
so it runs `fmzoo.infer.generate` and prints once. Timing goes to stderr.
"""

from __future__ import annotations

import sys

HELP = "generate text from a model (preset, training workdir or HF dir), streamed"


EPILOG = """examples:
  fmzoo generate --model gpt-tiny --prompt "def " --max-new-tokens 32 --temperature 0.8
  fmzoo generate --model runs/gpt-tiny --prompt "def " --dtype bfloat16 --top-p 0.95
  fmzoo generate --model runs/rev --prompt "abcdef" --beams 4        (seq2seq: the source)"""


def add_arguments(p):
    from fmzoo.cli import Formatter
    p.epilog, p.formatter_class = EPILOG, Formatter
    p.add_argument("--model", required=True,
                   help="preset name (random weights), training workdir, or HF checkpoint dir")
    p.add_argument("--prompt", required=True,
                   help="text to continue (for seq2seq models: the source sentence)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus cut")
    p.add_argument("--beams", type=int, default=1, help="beam search width (1 = no beams)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-prob / new_tokens ** length_penalty")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute and parameter dtype (default: the model's own)")
    p.add_argument("--no-eos", action="store_true",
                   help="do not stop at the end-of-sequence token")


class _Printer:
    """Prints the growing decoded text's new part; holds back an unfinished UTF-8 char."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character still in flight
            return
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
        self.shown = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        self.out.write("\n")
        self.out.flush()


def run(args) -> int:
    import fmzoo
    from fmzoo.infer import GenerateStats, generate, make_engine, stream
    from fmzoo.infer.generate import validate

    model, params, config, tokenizer = fmzoo.load(args.model, dtype=args.dtype)
    if tokenizer is None:
        print(f"error: {args.model!r} has no tokenizer; save one next to the checkpoint "
              "(tokenizer.json, tokenizer.model or fmzoo_tokenizer.json)", file=sys.stderr)
        return 2
    seq2seq = make_engine(model).seq2seq
    # A decoder-only LM continues from BOS + text; a seq2seq source is the text alone.
    ids = tokenizer.encode(args.prompt, add_bos=not seq2seq and tokenizer.bos_id is not None)
    eos_id = None if args.no_eos else tokenizer.eos_id
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, rng=args.seed)
    # every flag is checked as the API checks it (same messages), before any compilation
    validate(config, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, num_beams=args.beams,
             length_penalty=args.length_penalty, seq2seq=seq2seq)
    printer = _Printer(tokenizer, sys.stdout)
    try:
        if args.beams > 1:
            (tokens,), stats = generate(model, params, [ids], num_beams=args.beams,
                                        length_penalty=args.length_penalty,
                                        return_stats=True, **opts)
            for t in tokens:
                printer.add(t)
        else:
            stats = GenerateStats(1, len(ids), 0, 0.0, 0.0, False)
            for t in stream(model, params, ids, stats=stats, **opts):
                printer.add(t)
    except ValueError as e:  # GenerationError: a bad flag value, before any compilation
        print(f"error: {e}", file=sys.stderr)
        return 2
    printer.finish()
    note = " (includes compilation)" if stats.compiled else ""
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new] "
          f"time to first token {stats.ttft_s * 1e3:.1f} ms{note}; "
          f"decode {stats.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0
