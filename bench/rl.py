"""Online RL on the embedded tasks, measured end to end with the CLI (issue 12):

  grpo      exact match before / after `fmzoo grpo` with the checker reward, from one SFT
            workdir, and the rollout / update throughput of the run;
  frontier  the reward-vs-KL frontier of DPO and PPO (the DPO paper's comparison, small):
            a reward model trained on checker-labelled pairs scores held-out samples of each
            policy; KL is the sampled sequence KL(policy || SFT reference).

    python bench/rl.py grpo --sft runs/sft --workdir /tmp/rl-bench [--json]
    python bench/rl.py frontier --sft runs/sft --workdir /tmp/rl-bench [--json]

With no --sft, an SFT workdir is trained first (llama-tiny on tasks/reverse, 210 steps:
held-out exact match about 0.25, where a policy has room to improve). Prints a table (or
one JSON object per measurement with --json); the figures go to WORKDIR/frontier.png and
WORKDIR/ppo_curves.png. Numbers go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TASK = ["--data", "tasks/reverse"]
OPTS: dict = {}
LEN = ["--max-length", "40"]


def fmzoo(*args: str) -> float:
    """Runs one fmzoo command; returns its wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fmzoo", *args, "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def sft(workdir: str) -> str:
    out = os.path.join(workdir, "sft")
    if not os.path.exists(out):
        fmzoo("sft", "--model", "llama-tiny", *TASK, *LEN, "--steps", "210", "--workdir", out)
    return out


def rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def policy_stats(policy: str, reference: str, rm: str | None, n: int = 128,
                 samples: int = 4) -> dict:
    """Held-out: greedy exact match; on `samples` sampled completions per prompt (T = 1):
    the reward model's mean score and the sequence KL(policy || reference) (k1: the sum of
    log pi - log ref over the sampled tokens, averaged over completions)."""
    import jax
    import numpy as np

    import fmzoo
    from fmzoo.models.chat import end_of_turn_ids
    from fmzoo.train import prompt_data, tasks
    from fmzoo.train.reward_sources import reward_model_reward
    from fmzoo.train.rollout import rollout, sequence_logps
    pol, ref = fmzoo.load(policy), fmzoo.load(reference)
    tok = pol.tokenizer
    prompts = prompt_data.load_prompts("tasks/reverse", tok, split="validation", limit=n,
                                       **OPTS)
    ids, eos = [p["prompt_ids"] for p in prompts], end_of_turn_ids(tok)
    kw = dict(max_new_tokens=8, eos_ids=eos, max_length=40)
    greedy = rollout(pol.model, pol.params, tok, ids, group_size=1, temperature=0.0, **kw)
    check = tasks.checker_for("tasks/reverse")
    em = np.mean([check({"prompt": p["prompt_text"], "answer": p["columns"]["answer"]}, c)
                  for p, c in zip(prompts, greedy.completions)])
    ro = rollout(pol.model, pol.params, tok, ids, group_size=samples, temperature=1.0,
                 rng=jax.random.key(7), **kw)
    ref_logps = np.asarray(sequence_logps(ref.model, ref.params, ro.tokens, ro.mask,
                                          ro.response_mask))
    kl = float((ro.old_logps - ref_logps).sum(1).mean())
    out = {"exact_match": float(em), "kl": kl,
           "mean_length": float(ro.completion_lengths.mean())}
    if rm is not None:
        r = fmzoo.load(rm)
        score = reward_model_reward(r.model, r.params, r.tokenizer)
        out["rm_reward"] = float(np.mean(score(ro.expand([p["prompt"] for p in prompts]),
                                               ro.completions)))
    return out


def run_grpo(args) -> list[dict]:
    base = args.sft or sft(args.workdir)
    out = []
    for lr in args.lrs:
        w = os.path.join(args.workdir, f"grpo_lr{lr}")
        if not os.path.exists(w):
            fmzoo("grpo", "--model", base, *TASK, *LEN, "--workdir", w, "--steps",
                  str(args.steps), "--batch-size", "64", "--num-generations", "8",
                  "--max-new-tokens", "8", "--temperature", str(args.temperature),
                  "--lr", str(lr), "--eval-every", str(args.steps), "--eval-examples", "128",
                  "--eval-max-new-tokens", "8", "--save-every", str(args.steps))
        log = rows(w)
        evals = [r for r in log if "eval_exact_match" in r]
        train = [r for r in log if "loss" in r]
        out.append({"case": f"grpo lr {lr}", "steps": args.steps,
                    "exact_match_before": evals[0]["eval_exact_match"],
                    "exact_match_after": evals[-1]["eval_exact_match"],
                    "reward_first10": sum(r["reward"] for r in train[:10]) / 10,
                    "reward_last10": sum(r["reward"] for r in train[-10:]) / 10,
                    "rollout_tokens_per_s": sorted(r["rollout_tokens_per_s"]
                                                   for r in train[1:])[len(train) // 2],
                    "update_rows_per_s": sorted(r.get("tokens_per_s", 0)
                                                for r in train[1:])[len(train) // 2]})
    return out


def run_frontier(args) -> list[dict]:
    base = args.sft or sft(args.workdir)
    rm = os.path.join(args.workdir, "rm")
    if not os.path.exists(rm):  # checker-labelled pairs: the right answer vs a wrong one
        fmzoo("reward", "--model", base, *TASK, *LEN, "--steps", str(args.rm_steps),
              "--workdir", rm)
    out = [{"case": "sft", "beta": None, **policy_stats(base, base, rm)}]
    for beta in args.betas:
        w = os.path.join(args.workdir, f"dpo_beta{beta}")
        if not os.path.exists(w):
            fmzoo("dpo", "--model", base, *TASK, *LEN, "--steps", "60", "--beta", str(beta),
                  "--workdir", w, "--eval-every", "0")
        out.append({"case": "dpo", "beta": beta, **policy_stats(w, base, rm)})
    for kl_coef in args.kl_coefs:
        w = os.path.join(args.workdir, f"ppo_kl{kl_coef}")
        if not os.path.exists(w):
            fmzoo("ppo", "--model", base, "--reward", rm, *TASK, *LEN, "--steps", "64",
                  "--kl-coef", str(kl_coef), "--max-new-tokens", "8", "--workdir", w,
                  "--eval-every", "0")
        out.append({"case": "ppo", "beta": kl_coef, **policy_stats(w, base, rm)})
    _plot(out, os.path.join(args.workdir, "frontier.png"))
    _plot_ppo(args.workdir, args.kl_coefs, os.path.join(args.workdir, "ppo_curves.png"))
    held = [r for r in rows(rm) if "eval_accuracy" in r]
    out.append({"case": "reward model", "eval_accuracy": held[-1]["eval_accuracy"]})
    return out


def _plot_ppo(workdir: str, kl_coefs: list, path: str) -> None:
    """PPO's reward (objective/scores) and KL (objective/kl) per step, one line per
    --kl-coef."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    for kl_coef in kl_coefs:
        log = [r for r in rows(os.path.join(workdir, f"ppo_kl{kl_coef}"))
               if "objective/scores" in r]
        steps = [r["step"] for r in log]
        a.plot(steps, [r["objective/scores"] for r in log], label=f"kl_coef {kl_coef:g}")
        b.plot(steps, [r["objective/kl"] for r in log], label=f"kl_coef {kl_coef:g}")
    a.set_title("reward model score (rollouts)")
    b.set_title("KL(policy || SFT) per completion")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for case, marker in (("sft", "*"), ("dpo", "o"), ("ppo", "s")):
        pts = [r for r in results if r["case"] == case]
        ax.scatter([r["kl"] for r in pts], [r["rm_reward"] for r in pts], marker=marker,
                   label=case)
        for r in pts:
            if r["beta"] is not None:
                ax.annotate(f"{r['beta']:g}", (r["kl"], r["rm_reward"]), fontsize=7)
    ax.set_xlabel("KL(policy || SFT), nats per completion")
    ax.set_ylabel("reward model score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("grpo", "frontier"))
    p.add_argument("--sft", help="an SFT workdir (default: train one)")
    p.add_argument("--workdir", default="/tmp/fmzoo-rl-bench")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-5])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    p.add_argument("--kl-coefs", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    p.add_argument("--rm-steps", type=int, default=600)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = run_grpo(args) if args.what == "grpo" else run_frontier(args)
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r.items()))


if __name__ == "__main__":
    main()
