"""What `fmzoo run` measures after each stage, the same way for every stage's model, and the
report it ends with (a table on stdout, W/report.json, W/report.png).

- exact_match: greedy answers to held-out prompts of the task (its test split, never trained
  on), checked by the task's checker.
- mean_reward: the checker's mean reward of one sampled answer per held-out prompt at GRPO's
  temperature: what GRPO optimises, measured on prompts it never saw.
- preference_accuracy: on the held-out pairs (W/pairs/valid.jsonl, labelled like DPO's), the
  share of pairs whose implicit reward log pi/pi_sft ranks the chosen answer first, as TRL's
  rewards/accuracies; from the DPO stage on (before it, the policy is the reference).
- best_constant_answer: the exact match of the single answer most common among those
  prompts (a floor: a model that learned only the answers' prior scores this much).
- eval_loss: the stage's own held-out loss as its trainer logged it (pretrain: nats per
  byte of the corpus; SFT: completion nats per token; DPO: the DPO loss); each stage's own
  objective, not comparable across stages.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

from .pipeline import STAGES, Plan, stage_dir

COLUMNS = (("stage", "{}"), ("exact_match", "{:.3f}"), ("mean_reward", "{:.3f}"),
           ("preference_accuracy", "{:.3f}"), ("eval_loss", "{:.3f}"), ("seconds", "{:.0f}"))


class StageMeter:
    """(stage) -> the stage's measurements. Every stage's model has the base's config, so the
    decoders compile once for the whole pipeline."""

    def __init__(self, plan: Plan, workdir: str):
        self.plan, self.workdir = plan, workdir
        self._reference = None

    def _examples(self, tok) -> list[dict]:
        from .sft_data import sft_eval_prompts
        opts = dict(kv.split("=", 1) for kv in self.plan.task_options)
        return sft_eval_prompts(self.plan.task, tok, split="test", n=self.plan.eval_examples,
                                **opts)

    def __call__(self, stage: str) -> dict:
        if stage == "label":
            return {}
        import fmzoo
        loaded = fmzoo.load(stage_dir(self.workdir, stage))
        tok = loaded.tokenizer
        examples = self._examples(tok)
        out = {"exact_match": None, "mean_reward": None, "preference_accuracy": None,
               "eval_loss": last_eval_loss(stage_dir(self.workdir, stage))}
        out.update(answers(loaded, tok, examples, self.plan))
        if stage in ("dpo", "grpo"):
            if self._reference is None:
                self._reference = fmzoo.load(stage_dir(self.workdir, "sft")).params
            out["preference_accuracy"] = preference_accuracy(
                loaded, self._reference, tok, os.path.join(stage_dir(self.workdir, "label")),
                self.plan.max_length)
        return out


def last_eval_loss(workdir: str) -> float | None:
    from .metrics import read_metrics
    rows = [r for r in read_metrics(workdir) if "eval_loss" in r]
    return float(rows[-1]["eval_loss"]) if rows else None


def answers(loaded: Any, tok: Any, examples: list[dict], plan: Plan) -> dict:
    """Greedy exact match, the sampled mean reward and one sample conversation."""
    import jax

    from fmzoo.models.chat import end_of_turn_ids

    from .rollout import rollout
    from .sft import exact_match_eval, score
    metrics, shown = exact_match_eval(loaded.model, tok, examples,
                                      max_new_tokens=plan.max_new_tokens, show=1)(loaded.params)
    r = rollout(loaded.model, loaded.params, tok, [e["prompt_ids"] for e in examples],
                group_size=1, max_new_tokens=plan.max_new_tokens,
                temperature=plan.grpo_temperature, eos_ids=end_of_turn_ids(tok),
                rng=jax.random.key(plan.seed + 1), max_length=plan.max_length)
    rewards = score(examples, list(r.completions))
    # what one fixed answer to every prompt would score: a floor exact match must clear
    # before it says anything was learned
    counts = collections.Counter(str(e["answer"]).strip() for e in examples)
    return {"exact_match": metrics["eval_exact_match"], "mean_reward": float(np.mean(rewards)),
            "best_constant_answer": max(counts.values()) / len(examples), "sample": shown}


def preference_accuracy(loaded: Any, ref_params: Any, tok: Any, pairs_dir: str,
                        max_length: int) -> float | None:
    """Share of held-out pairs with (log pi - log ref)(chosen) > (log pi - log ref)(rejected)."""
    import jax

    from .dpo_losses import sequence_logps
    from .pref_data import pref_batches
    if not os.path.exists(os.path.join(pairs_dir, "valid.jsonl")):
        return None
    logps = jax.jit(lambda p, b: sequence_logps(loaded.model, p, b)["logps"])
    right, total = 0, 0
    for batch in pref_batches(pairs_dir, tok, batch_size=16, max_length=max_length,
                              split="validation", shuffle=False, num_epochs=1, shard_index=0,
                              shard_count=1):
        real = np.asarray(batch["mask"]).any(axis=(1, 2))  # the last batch is padded
        b = {k: batch[k] for k in ("tokens", "mask", "response_mask")}
        margin = np.asarray(logps(loaded.params, b) - logps(ref_params, b))
        right += int(((margin[:, 0] > margin[:, 1]) & real).sum())
        total += int(real.sum())
    return right / total if total else None


# ----------------------------------------------------------------------------- the report


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def stage_line(r: dict) -> str:
    return "   ".join(f"{k} {_cell(r.get(k), f)}" for k, f in COLUMNS)


def table(stages: list[dict]) -> str:
    head = "| " + " | ".join(k for k, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_cell(s.get(k), f) for k, f in COLUMNS) + " |" for s in stages]
    return "\n".join([head, rule, *rows])


TIME_BUDGET_S = 300.0  # the whole pipeline, data builds included, on a 2-core CPU


def targets(by: dict, total_seconds: float) -> list[dict]:
    """The main job's targets, each with its measured value, met or not, and the gap."""
    def em(stage):
        return by.get(stage, {}).get("exact_match")
    rows = []

    def add(name, value, goal, met):
        if value is not None:
            rows.append({"target": name, "value": round(value, 3), "goal": goal, "met": met,
                         "gap": round(goal - value, 3) if not met else 0.0})
    add("total seconds <= 300", total_seconds, TIME_BUDGET_S, total_seconds <= TIME_BUDGET_S)
    if em("sft") is not None and em("pretrain") is not None:
        lift = em("sft") - em("pretrain")
        add("SFT exact match - base exact match >= 0.30", lift, 0.30, lift >= 0.30)
    dpo = by.get("dpo", {})
    if dpo.get("preference_accuracy") is not None:
        acc = dpo["preference_accuracy"]
        add("DPO held-out preference accuracy >= 0.8", acc, 0.8, acc >= 0.8)
    if em("dpo") is not None and em("sft") is not None:
        add("DPO exact match >= SFT exact match", em("dpo"), em("sft"), em("dpo") >= em("sft"))
    if em("grpo") is not None and em("dpo") is not None:
        add("GRPO exact match > DPO exact match", em("grpo"), em("dpo"), em("grpo") > em("dpo"))
    return rows


def write_report(workdir: str, state: dict) -> dict:
    stages = [state["stages"][s] for s in STAGES if s in state["stages"]]
    total = round(sum(s["seconds"] for s in stages), 1)
    report = {"stages": stages, "total_seconds": total, "plan": state["plan"],
              "complete": len(stages) == len(STAGES),
              "targets": targets({s["stage"]: s for s in stages}, total)}
    with open(os.path.join(workdir, "report.json.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(os.path.join(workdir, "report.json.tmp"), os.path.join(workdir, "report.json"))
    report["figure"] = plot_report(workdir, stages)
    return report


def plot_report(workdir: str, stages: list[dict]) -> str | None:
    """W/report.png: exact match, mean reward and preference accuracy per stage (left), each
    trainer stage's training loss over its steps (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import read_metrics
    if not stages:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [s["stage"] for s in stages if s["stage"] != "label"]
    rows = [s for s in stages if s["stage"] != "label"]
    x = np.arange(len(names))
    for i, (key, label) in enumerate((("exact_match", "held-out exact match"),
                                      ("mean_reward", "held-out mean reward (sampled)"),
                                      ("preference_accuracy", "held-out preference accuracy"))):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=label)
    floor = next((r["best_constant_answer"] for r in rows
                  if r.get("best_constant_answer") is not None), None)
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label="best constant answer (floor)")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_title("each stage's model, measured the same way")
    ax.legend(fontsize=7, loc="upper left")
    for s in names:
        m = [r for r in read_metrics(stage_dir(workdir, s)) if "loss" in r and "step" in r]
        if m:
            bx.plot([r["step"] for r in m], [r["loss"] for r in m], label=s)
    bx.set_xlabel("step of the stage")
    bx.set_ylabel("training loss (each stage's own)")
    bx.set_title("loss curves")
    if bx.lines:
        bx.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, "report.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
