"""RLAIF on a CPU: a small LM TAUGHT to judge (`fmzoo sft --data tasks/judge`), measured
against the task checker, then used as the AI labeller for DPO.

    python bench/rlaif.py                         # builds the SFT policy and the judge
    python bench/rlaif.py --policy runs/sft --judge runs/judge --json

1. The policy: llama-tiny, `fmzoo sft --data tasks/reverse --data-opt max_word=3
   --data-opt min_word=3 --steps 200` (bench/RESULTS.md's DPO section), unless --policy.
2. The judge: llama-tiny finetuned on tasks/judge over the same base task (its prompt is
   exactly the LMJudge template; answer "1" or "2"; 300 steps at lr 3e-3), unless --judge.
   By default it starts from the SFT policy (a same-size labeller, as in Lee et al.'s
   same-size RLAIF); --judge-init scratch starts from a fresh llama-tiny.
3. (a) agreement of the LM judge with the checker (judges.agreement): on held-out pairs of
   the policy's own samples (test prompts, two samples each, pairs the checker orders) and
   on the judge task's held-out pairs (the right answer against a corrupted one).
4. (b) `fmzoo label` (train.label.label: the CLI has no --data-opt) with the LM judge and
   with the checker, same prompts, seed and temperature (0.5), hence the very same
   response pairs; `fmzoo dpo`
   from the policy on each (same steps and recipe lr); held-out greedy exact match before
   and after each.

Writes nothing but stdout: the runs live in a temporary directory (or --workdir, kept).
The numbers go into bench/RESULTS.md by hand ("RLAIF (issue 12)"). About 15 minutes on 2
shared CPU cores, 4 when --policy and --judge are given. Stderr carries the fmzoo logs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TASK = "tasks/reverse"
WORDS = {"max_word": 3, "min_word": 3}


def fmzoo_cli(*args: str) -> float:
    """Runs `fmzoo ARGS` (its log to stderr); returns its wall seconds."""
    cmd = [sys.executable, "-m", "fmzoo", *args]
    print("$ fmzoo " + " ".join(args), file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode:
        raise SystemExit(f"`fmzoo {' '.join(args)}` failed (exit {done.returncode})")
    return time.perf_counter() - start


def data_opts(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in ("--data-opt", f"{k}={v}")]


def held_out(tok, n: int, split: str = "test") -> list[dict]:
    """Prompts of the base task's held-out split as exact-match examples (prompt_ids)."""
    from fmzoo.train import prompt_data
    rows = prompt_data.load_prompts(TASK, tok, split=split, limit=n, **WORDS)
    return [{"prompt_ids": r["prompt_ids"], "prompt_text": r["prompt_text"],
             "prompt": r["prompt_text"], **r["columns"]} for r in rows]


def exact_match(workdir: str, n: int) -> float:
    from fmzoo import load
    from fmzoo.train.sft import exact_match_eval
    m = load(workdir)
    run = exact_match_eval(m.model, m.tokenizer, held_out(m.tokenizer, n),
                           max_new_tokens=8, show=0)
    return float(run(m.params)[0]["eval_exact_match"])


def sample_pairs(workdir: str, n: int, seed: int, temperature: float
                 ) -> tuple[list, list, list, list]:
    """(prompts, first, second, answers): two samples per held-out prompt."""
    from fmzoo import load
    from fmzoo.infer import generate
    from fmzoo.models.chat import end_of_turn_ids
    m = load(workdir)
    ex = held_out(m.tokenizer, n)
    eos = end_of_turn_ids(m.tokenizer)
    outs = generate(m.model, m.params, [e["prompt_ids"] for e in ex for _ in range(2)],
                    max_new_tokens=8, temperature=temperature, eos_id=eos, rng=seed)
    text = [m.tokenizer.decode([t for t in o if t not in eos]) for o in outs]
    return ([e["prompt_text"] for e in ex], text[0::2], text[1::2],
            [e["answer"] for e in ex])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="an SFT workdir of the policy (default: trained here)")
    p.add_argument("--judge", help="a judge workdir (default: trained here on tasks/judge)")
    p.add_argument("--judge-init", choices=("scratch", "policy"), default="policy",
                   help="the judge's starting point when trained here")
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--judge-steps", type=int, default=300)
    p.add_argument("--judge-batch", type=int, default=32)
    p.add_argument("--judge-lr", type=float, default=3e-3,
                   help="the judge's SFT peak lr (llama-tiny's pretraining recipe)")
    p.add_argument("--temperature", type=float, default=0.5,
                   help="sampling temperature of the two responses (at 1 a 200-step policy "
                        "rarely gets one right, so the checker orders few pairs)")
    p.add_argument("--dpo-steps", type=int, default=40)
    p.add_argument("--label-prompts", type=int, default=512)
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="fmzoo-rlaif-")
    root = args.workdir or tmp.name
    os.makedirs(root, exist_ok=True)
    data_dir = os.path.join(root, "tfds")
    common = ["--data-dir", data_dir, "--no-progress"]
    out: dict = {"bench": "rlaif", "commands": []}
    seconds: dict[str, float] = {}

    def cli(name: str, *a: str) -> None:
        out["commands"].append("fmzoo " + " ".join(a))
        seconds[name] = fmzoo_cli(*a)

    policy = args.policy
    if policy is None:
        policy = os.path.join(root, "policy")
        cli("sft policy", "sft", "--model", "llama-tiny", "--data", TASK, *data_opts(WORDS),
            "--steps", str(args.sft_steps), "--batch-size", "32", "--max-length", "40",
            "--eval-every", "0", "--eval-examples", "0", "--no-eval-at-start",
            "--workdir", policy, *common)
    judge_dir = args.judge
    if judge_dir is None:
        judge_dir = os.path.join(root, "judge")
        start = policy if args.judge_init == "policy" else "llama-tiny"
        lr = ["--lr", str(args.judge_lr)]
        cli("sft judge", "sft", "--model", start, "--data", "tasks/judge",
            *data_opts({"base": "reverse", **WORDS}), "--steps", str(args.judge_steps),
            "--batch-size", str(args.judge_batch), "--max-length", "144", *lr,
            "--eval-every", "0", "--eval-examples", "0", "--no-eval-at-start",
            "--workdir", judge_dir, *common)

    from fmzoo.train import judges, tasks
    from fmzoo.train.label import label

    t0 = time.perf_counter()
    lm_judge = judges.load_judge(judge_dir, batch_size=32)
    checker = judges.load_judge(TASK)
    # (a) on the policy's own held-out samples
    prompts, first, second, answers = sample_pairs(policy, args.eval_prompts, args.seed,
                                                   args.temperature)
    out["agreement_policy_samples"] = judges.agreement(lm_judge, checker, prompts, first,
                                                       second, answer=answers)
    # ... and on the judge task's held-out pairs (right vs corrupted: in distribution)
    jex = tasks.examples("tasks/judge", "test", base="reverse", **WORDS)[:args.eval_prompts]
    fields = [tasks.parse_judge_prompt(e["prompt"]) for e in jex]
    out["agreement_judge_task"] = judges.agreement(
        lm_judge, checker, [f["prompt"] for f in fields], [f["first"] for f in fields],
        [f["second"] for f in fields])
    seconds["agreement"] = time.perf_counter() - t0

    # (b) the same prompts and seed: the same response pairs, labelled two ways
    runs = {}
    for name, judge in (("lm_judge", lm_judge), ("checker", TASK)):
        t0 = time.perf_counter()
        pairs = os.path.join(root, f"pairs_{name}.jsonl")
        summary = label(policy, judge, TASK, pairs, max_new_tokens=8, max_length=40,
                        temperature=args.temperature, seed=args.seed,
                        limit=args.label_prompts, data_options=WORDS, progress=False)
        with open(pairs) as f:
            recs = [json.loads(line) for line in f]
        check = tasks.checker_for(TASK)
        scored = [(check(r, r["chosen"][0]["content"]), check(r, r["rejected"][0]["content"]))
                  for r in recs]
        # the pairs the checker orders, and how many of those the labels got the right way
        decided = sum(c != w for c, w in scored)
        right_way = sum(c > w for c, w in scored)
        seconds[f"label {name}"] = time.perf_counter() - t0
        dpo_dir = os.path.join(root, f"dpo_{name}")
        out["commands"].append(f"train.label.label({policy!r}, {name}, {TASK!r}, {pairs!r}, "
                               f"max_new_tokens=8, max_length=40, temperature={args.temperature}, "
                               f"seed={args.seed}, "
                               f"limit={args.label_prompts}, data_options={WORDS})")
        cli(f"dpo {name}", "dpo", "--model", policy, "--data", pairs, "--steps",
            str(args.dpo_steps), "--batch-size", "16", "--max-length", "40",
            "--eval-every", "0", "--workdir", dpo_dir, *common)
        runs[name] = {"pairs": summary["pairs"], "ties": summary["ties"],
                      "empty": summary["empty"], "checker_decided": decided,
                      "label_accuracy": right_way / decided if decided else float("nan"),
                      "mean_confidence": summary["mean_confidence"],
                      "exact_match": exact_match(dpo_dir, args.eval_prompts)}
    out["exact_match_before"] = exact_match(policy, args.eval_prompts)
    out["runs"], out["seconds"] = runs, seconds
    if tmp is not None:
        tmp.cleanup()

    if args.json:
        print(json.dumps(out))
        return 0
    a, j = out["agreement_policy_samples"], out["agreement_judge_task"]
    print(f"LM judge agreement with the checker: {a['agreement']:.3f} on {a['pairs']} held-out "
          f"pairs of the policy's samples ({a['reference_ties']} checker ties left out); "
          f"{j['agreement']:.3f} on {j['pairs']} held-out tasks/judge pairs")
    print(f"held-out exact match before DPO: {out['exact_match_before']:.3f} "
          f"({args.eval_prompts} test prompts, greedy)\n")
    print("| labels | pairs written (ties skipped) | mean abs(p - 0.5) | of them ordered by the "
          "checker | labelled the checker's way | exact match after DPO |\n"
          "|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['pairs']} ({r['ties']}) | {r['mean_confidence']:.2g} | "
              f"{r['checker_decided']} | {r['label_accuracy']:.3f} | {r['exact_match']:.3f} |")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print("\n".join(out["commands"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
