"""`fmzoo label` (RLAIF): sample two responses per prompt from a policy, let a judge pick
the better one, write TRL preference JSONL (fmzoo.train.label)."""

from __future__ import annotations

HELP = "label preference pairs with a judge (RLAIF): two samples per prompt -> pairs.jsonl"

EPILOG = """examples:
  fmzoo label --model runs/sft --judge llama-judge-dir --data tasks/mix --out pairs.jsonl
  fmzoo label --model runs/sft --judge runs/rm --data prompts.jsonl --out pairs.jsonl
  fmzoo label --model runs/sft --judge tasks/mix --data tasks/mix --out pairs.jsonl --limit 500
then:
  fmzoo dpo --model runs/sft --data pairs.jsonl --workdir runs/dpo

--judge: a model (preset, training workdir, Hugging Face dir) read as an LM judge (the
next-token probabilities of "1" vs "2", both orders averaged); a reward-model workdir from
`fmzoo reward` (sigmoid of the score difference); checker / tasks/NAME (the embedded task's
checker) or module:function (a TRL reward function), which prefer the higher reward."""


def add_arguments(p):
    from fmzoo.cli import Formatter
    p.epilog, p.formatter_class = EPILOG, Formatter
    p.add_argument("--model", required=True,
                   help="the policy that samples: a preset, training workdir or HF dir")
    p.add_argument("--judge", required=True, metavar="SPEC",
                   help="the judge: a model (LM judge), a reward-model workdir, checker, "
                        "tasks/NAME or module:function")
    p.add_argument("--data", required=True, metavar="NAME|PATH",
                   help="prompts: an embedded task (tasks/mix, ...) or a JSONL of "
                        "{\"prompt\": text or messages, ...} (its train split)")
    p.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="embedded task option, repeatable, e.g. max_word=3")
    p.add_argument("--out", required=True, metavar="PAIRS.jsonl",
                   help="the preference JSONL to write (replaced atomically)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response at most")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (> 0: two greedy responses would be equal)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--limit", type=int, default=None, help="label the first N prompts only")
    p.add_argument("--max-length", type=int, default=None,
                   help="prompt + response tokens at most (default: the policy's max_len)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts sampled together (one compiled decoder for every chunk)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the policy's tokenizer directory (default: the model's own, else bytes)")
    p.add_argument("--judge-tokenizer", default=None, metavar="DIR",
                   help="the judge model's tokenizer directory (default: the judge's own)")


def run(args) -> int:
    from fmzoo.train.config import parse_pairs
    from fmzoo.train.label import label
    s = label(args.model, args.judge, args.data, args.out, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              seed=args.seed, limit=args.limit, max_length=args.max_length,
              tokenizer=args.tokenizer, judge_tokenizer=args.judge_tokenizer,
              batch_size=args.batch_size,
              data_options=parse_pairs(args.data_opt, "--data-opt"))
    print(f"wrote {s['pairs']} pairs to {s['out']} from {s['prompts']} prompts; skipped "
          f"{s['ties']} ties (equal responses or p = 0.5) and {s['empty']} with an empty "
          f"response; mean |p - 0.5| = {s['mean_confidence']:.3f}"
          + (f"; {s['truncated']} judging inputs cut to fit" if s["truncated"] else ""))
    return 0
