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
  fmzoo generate --model runs/rev --prompt "abcdef" --beams 4        (seq2seq: the source)
  fmzoo generate --model ./Llama-3.2-1B-Instruct --prompt "Hi" --eos-id 128001,128009 --stop "\\n\\n"
  fmzoo generate --model gpt-tiny --prompt "def " --mesh data=1,tensor=2 --repetition-penalty 1.3

Settings you do not give come from the checkpoint's generation_config.json."""


def _eos_ids(text: str) -> list[int]:
    import argparse
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eos-id {text!r}: token ids are integers; write "
                                         "e.g. --eos-id 2 --eos-id 7 or --eos-id 2,7") from None
    if not ids:
        raise argparse.ArgumentTypeError("--eos-id needs at least one token id")
    return ids


def _early_stopping(text: str):
    import argparse
    value = {"true": True, "false": False, "never": "never"}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"--early-stopping {text!r}: choose true, false or "
                                         "never (transformers' meanings)")
    return value


def add_arguments(p):
    from fmzoo.cli import Formatter
    p.epilog, p.formatter_class = EPILOG, Formatter
    p.add_argument("--model", required=True,
                   help="preset name (random weights), training workdir, or HF checkpoint dir")
    p.add_argument("--prompt", required=True,
                   help="text to continue (for seq2seq models: the source sentence)")
    # None = the checkpoint's generation_config.json (or fmzoo's default: greedy, 64 tokens)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate at most (default: the checkpoint's, else 64)")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="EOS is suppressed until this many tokens are generated")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config.json, else 0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="0 = no top-k cut (default: the checkpoint's, else 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="1 = no nucleus cut (default: the checkpoint's, else 1)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition penalty, 1 = off (default: the checkpoint's)")
    p.add_argument("--beams", type=int, default=1, help="beam search width (1 = no beams)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-prob / new_tokens ** length_penalty")
    p.add_argument("--early-stopping", type=_early_stopping, default=False,
                   metavar="{true,false,never}", help="beam search stop rule (transformers')")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute and parameter dtype (default: the model's own)")
    p.add_argument("--eos-id", type=_eos_ids, action="append", default=None, metavar="ID[,ID]",
                   help="end-of-sequence token id(s); repeat or comma-separate for several "
                        "(default: the checkpoint's eos_token_id list)")
    p.add_argument("--no-eos", action="store_true",
                   help="do not stop at the end-of-sequence token")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the output contains STR (cut from the output); repeatable")
    p.add_argument("--mesh", default=None,
                   help="device mesh as for `fmzoo train --mesh`, e.g. data=2,tensor=4: params "
                        "and KV cache sharded by the zoo's rules")


class _Printer:
    """Prints the growing decoded text's new part; holds back an unfinished UTF-8 char and
    any tail that could still become a stop string. `add` returns False once a stop string
    appeared (the text is cut before it)."""

    def __init__(self, tokenizer, out, stops=()):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""
        self.stops = [s for s in stops if s]
        self.hold = max(map(len, self.stops), default=1) - 1
        self.stopped = False

    def _cut(self, text: str) -> str:
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        return text

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def add(self, token: int) -> bool:
        if self.stopped:
            return False
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character still in flight
            return True
        text = self._cut(text)
        self._show(text if self.stopped else text[:len(text) - self.hold])
        return not self.stopped

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids) if not self.stopped else None
        if text is not None:
            self._show(self._cut(text))
        self.out.write("\n")
        self.out.flush()
        return self.shown


def settings(args, generation) -> dict:
    """The decoding keywords: flags where given, else the checkpoint's defaults."""
    if args.no_eos and args.eos_id:
        raise ValueError("--no-eos and --eos-id exclude each other; drop one")
    if args.eos_id:
        eos = [i for group in args.eos_id for i in group]
        eos = eos[0] if len(eos) == 1 else eos
    else:
        eos = None if args.no_eos else generation.eos_id
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    return dict(max_new_tokens=pick(args.max_new_tokens, generation.max_new_tokens or 64),
                temperature=pick(args.temperature, generation.temperature),
                top_k=pick(args.top_k, generation.top_k), top_p=pick(args.top_p, generation.top_p),
                repetition_penalty=pick(args.repetition_penalty, generation.repetition_penalty),
                min_new_tokens=args.min_new_tokens, eos_id=eos)


def run(args) -> int:
    import fmzoo
    from fmzoo.infer import GenerateStats, generate, stream, validate
    from fmzoo.models.config import LMConfig

    try:
        mesh = None
        if args.mesh is not None:
            from fmzoo.train.mesh import make_mesh
            mesh = make_mesh(args.mesh)
        if any(s == "" for s in args.stop):
            raise ValueError("--stop needs a non-empty string")
        loaded = fmzoo.load(args.model, dtype=args.dtype)
        if loaded.tokenizer is None:
            raise ValueError(f"{args.model!r} has no tokenizer; save one next to the checkpoint "
                             "(tokenizer.json, tokenizer.model or fmzoo_tokenizer.json)")
        model, params, config, tokenizer = loaded
        seq2seq = not isinstance(config, LMConfig)
        # A decoder-only LM continues from BOS + text; a seq2seq source is the text alone.
        ids = tokenizer.encode(args.prompt,
                               add_bos=not seq2seq and tokenizer.bos_id is not None)
        opts = settings(args, loaded.generation)
        # every flag is checked as the API checks it (same messages), before any compilation
        validate(config, [ids], num_beams=args.beams, length_penalty=args.length_penalty,
                 early_stopping=args.early_stopping, seq2seq=seq2seq, **opts)
    except ValueError as e:  # GenerationError, MeshError, ConfigError: a bad flag value
        print(f"error: {e}", file=sys.stderr)
        return 2
    printer = _Printer(tokenizer, sys.stdout, args.stop)
    if args.beams > 1:
        (tokens,), stats = generate(model, params, [ids], num_beams=args.beams,
                                    length_penalty=args.length_penalty,
                                    early_stopping=args.early_stopping, rng=args.seed,
                                    mesh=mesh, return_stats=True, **opts)
        for t in tokens:
            if not printer.add(t):
                break
    else:
        stats = GenerateStats(1, len(ids), 0, 0.0, 0.0, False)
        for t in stream(model, params, ids, stats=stats, rng=args.seed, mesh=mesh, **opts):
            if not printer.add(t):
                break  # a stop string: leave the generator, no more decode steps
    printer.finish()
    note = " (includes compilation)" if stats.compiled else ""
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new] "
          f"time to first token {stats.ttft_s * 1e3:.1f} ms{note}; "
          f"decode {stats.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0
