"""`fmzoo run`: the road from a base model to a post-trained one, as five ordinary stages.

    pretrain  fmzoo train  --model PRESET --data CORPUS           -> W/pretrain (the base model)
    sft       fmzoo sft    --model W/pretrain --data TASK         -> W/sft
    label     fmzoo label  --model W/sft --judge TASK --data TASK -> W/pairs/{train,valid}.jsonl
    dpo       fmzoo dpo    --model W/sft --data W/pairs           -> W/dpo
    grpo      fmzoo grpo   --model W/dpo --data TASK --reward TASK-> W/grpo

Each stage is the same command a user would type (the report prints it), so every stage
directory is a workdir that `fmzoo.load`, `fmzoo chat` and the other commands accept. After
each stage the pipeline measures the stage's model the same way (train/pipeline_eval.py) and
records it in W/pipeline.json; `--resume` skips finished stages and continues the interrupted
one from its last checkpoint. The plan is saved with the run: a resume with another plan is
refused, so the stages of one report always come from one recipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from .config import config_error

STAGES = ("pretrain", "sft", "label", "dpo", "grpo")
STATE_FILE = "pipeline.json"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The recipe of one pipeline (the defaults are the measured 5-minute CPU run)."""
    model: str = "llama-tiny"
    overrides: tuple[str, ...] = ()  # model config key=value for the base (pretraining)
    corpus: str = "python_docs"
    task: str = "tasks/count"
    task_options: tuple[str, ...] = ()  # embedded task knobs key=value (max_word=4, ...)
    seed: int = 0
    pretrain_steps: int = 40
    pretrain_batch: int = 16
    pretrain_seq_len: int = 128
    sft_steps: int = 80
    sft_batch: int = 32
    sft_lr: float = 1e-3
    max_length: int = 64
    max_new_tokens: int = 3
    label_prompts: int = 384
    label_valid_prompts: int = 128
    label_temperature: float = 1.0
    dpo_steps: int = 48
    dpo_batch: int = 16
    dpo_beta: float = 0.1
    dpo_rpo_alpha: float = 1.0
    dpo_lr: float = 5e-5
    grpo_steps: int = 32
    grpo_batch: int = 64
    grpo_generations: int = 8
    grpo_temperature: float = 0.7
    grpo_lr: float = 5e-5
    eval_examples: int = 200

    def check(self) -> "Plan":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_steps", "_batch", "_prompts", "_examples", "_len",
                                "_length", "_tokens", "_generations")) and (
                    not isinstance(v, int) or v < 1):
                raise config_error(f"--{f.name.replace('_', '-')} must be a positive integer, "
                                  f"got {v!r}")
        if self.grpo_batch % self.grpo_generations:
            raise config_error(f"--grpo-batch {self.grpo_batch} must be a multiple of "
                              f"--grpo-generations {self.grpo_generations} (whole groups)")
        if self.max_new_tokens >= self.max_length:
            raise config_error(f"--max-new-tokens {self.max_new_tokens} must be below "
                              f"--max-length {self.max_length}")
        for kv in self.overrides + self.task_options:
            if "=" not in kv:
                raise config_error(f"{kv!r} is not KEY=VALUE (e.g. n_layers=2, max_word=4)")
        return self

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, "pairs" if stage == "label" else stage)


def _task_opts(plan: Plan) -> list[str]:
    return [a for kv in plan.task_options for a in ("--data-opt", kv)]


def _train_common(plan: Plan, steps: int, start_eval: bool = False) -> list[str]:
    # each stage saves once, at its end, plus the checkpoint a resume needs midway
    every = max(steps // 2, 1)
    return ["--steps", str(steps), "--seed", str(plan.seed), "--save-every", str(every),
            "--eval-every", "0", "--log-every", "10",
            *([] if start_eval else ["--no-eval-at-start"])]


def stage_command(plan: Plan, stage: str, workdir: str, progress: bool = True) -> list[str]:
    """The fmzoo command line of a trainer stage (without the program name)."""
    quiet = [] if progress else ["--no-progress"]
    d = lambda s: stage_dir(workdir, s)  # noqa: E731
    if stage == "pretrain":
        return ["train", "--model", plan.model, "--data", plan.corpus, "--workdir", d(stage),
                "--batch-size", str(plan.pretrain_batch), "--seq-len", str(plan.pretrain_seq_len),
                "--sample-tokens", "0", "--eval-batches", "2",
                *_train_common(plan, plan.pretrain_steps, start_eval=True), *quiet,
                *plan.overrides]
    gen_eval = ["--eval-examples", "0", "--eval-batches", "2"]
    if stage == "sft":
        return ["sft", "--model", d("pretrain"), "--data", plan.task, *_task_opts(plan),
                "--workdir", d(stage), "--batch-size", str(plan.sft_batch),
                "--max-length", str(plan.max_length), "--lr", str(plan.sft_lr), *gen_eval,
                *_train_common(plan, plan.sft_steps), *quiet]
    if stage == "dpo":
        return ["dpo", "--model", d("sft"), "--data", d("label"), "--workdir", d(stage),
                "--batch-size", str(plan.dpo_batch), "--max-length", str(plan.max_length),
                "--beta", str(plan.dpo_beta), "--rpo-alpha", str(plan.dpo_rpo_alpha),
                "--lr", str(plan.dpo_lr), "--precompute-ref", *gen_eval,
                *_train_common(plan, plan.dpo_steps), *quiet]
    if stage == "grpo":
        return ["grpo", "--model", d("dpo"), "--data", plan.task, *_task_opts(plan),
                "--reward", plan.task, "--workdir", d(stage),
                "--batch-size", str(plan.grpo_batch),
                "--num-generations", str(plan.grpo_generations),
                "--max-length", str(plan.max_length),
                "--max-new-tokens", str(plan.max_new_tokens),
                "--temperature", str(plan.grpo_temperature), "--lr", str(plan.grpo_lr),
                "--eval-examples", "0", *_train_common(plan, plan.grpo_steps), *quiet]
    raise ValueError(f"{stage!r} is not a trainer stage")


def label_stage(plan: Plan, workdir: str, progress: bool = True) -> dict:
    """Two samples of the SFT model per prompt, ordered by the task's checker: the train
    prompts' pairs train DPO, the validation prompts' pairs measure preference accuracy."""
    from .label import label
    out_dir = stage_dir(workdir, "label")
    os.makedirs(out_dir, exist_ok=True)
    opts = dict(kv.split("=", 1) for kv in plan.task_options)
    common = dict(max_new_tokens=plan.max_new_tokens, temperature=plan.label_temperature,
                  seed=plan.seed, max_length=plan.max_length, batch_size=64,
                  data_options=opts, progress=progress)
    summary = {}
    for split, n, name in (("train", plan.label_prompts, "train.jsonl"),
                           ("validation", plan.label_valid_prompts, "valid.jsonl")):
        summary[split] = label(stage_dir(workdir, "sft"), plan.task, plan.task,
                               os.path.join(out_dir, name), limit=n, split=split, **common)
    return {"pairs": summary["train"]["pairs"], "valid_pairs": summary["validation"]["pairs"],
            "ties": summary["train"]["ties"] + summary["validation"]["ties"]}


# ----------------------------------------------------------------------------- state, resume


def read_state(workdir: str) -> dict | None:
    path = os.path.join(workdir, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_state(workdir: str, state: dict) -> None:
    path = os.path.join(workdir, STATE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)  # a kill never leaves half a state file


def start_state(plan: Plan, workdir: str, resume: bool) -> dict:
    """The saved state to continue (resume) or a fresh one; every refusal before any work."""
    state = read_state(workdir)
    if resume:
        if state is None:
            raise config_error(f"--resume: {workdir} holds no pipeline ({STATE_FILE} is "
                              "missing); drop --resume to start one there")
        if state["plan"] != plan.as_dict():
            diff = sorted(k for k, v in plan.as_dict().items() if state["plan"].get(k) != v)
            raise config_error(f"--resume: the pipeline in {workdir} was started with other "
                              f"settings ({', '.join(diff)} differ); resume it with the same "
                              "options, or start a new --workdir")
        return state
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise config_error(f"--workdir {workdir} is not empty; pass --resume to continue the "
                          "pipeline there, or choose a new --workdir")
    return {"plan": plan.as_dict(), "stages": {}, "started": time.time()}


def _trainer(argv: list[str]):
    """The Trainer of a stage's command line: the command's own settings schema parses it,
    exactly as `fmzoo <command>` does, and its prepare function checks everything."""
    import argparse
    import importlib

    from .config import add_arguments, from_args
    module, cls, prepare = {"train": (".pretrain", "Settings", "prepare"),
                            "sft": (".sft", "SFTSettings", "prepare_sft"),
                            "dpo": (".dpo", "DPOSettings", "prepare_dpo"),
                            "grpo": (".grpo", "GRPOSettings", "prepare_grpo")}[argv[0]]
    mod = importlib.import_module(module, __package__)
    settings_cls = getattr(mod, cls)
    parser = argparse.ArgumentParser(prog=f"fmzoo {argv[0]}")
    add_arguments(parser, settings_cls)
    return getattr(mod, prepare)(from_args(parser.parse_args(argv[1:]), settings_cls))


def _run_command(argv: list[str], stage: str, resume: bool) -> None:
    from .checkpoint import RUN_FILE
    from .metrics import plot_metrics
    workdir = argv[argv.index("--workdir") + 1]
    if resume and os.path.exists(os.path.join(workdir, RUN_FILE)):
        argv = [argv[0], "--resume", *argv[1:]]  # interrupted: continue from its checkpoint
    elif os.path.isdir(workdir):
        import shutil  # started but never checkpointed: nothing to keep
        shutil.rmtree(workdir)
    _trainer(argv).run()
    plot_metrics(workdir)


def run_pipeline(plan: Plan, workdir: str, *, resume: bool = False, progress: bool = True,
                 stop_after: str | None = None, log=print) -> dict:
    """Runs (or continues) every stage, measuring each; returns the report (also written to
    W/report.json, with the figure W/report.png). `stop_after`: end after that stage (tests
    use it to interrupt a pipeline)."""
    from . import pipeline_eval
    plan = plan.check()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    state = start_state(plan, workdir, resume)
    os.makedirs(workdir, exist_ok=True)
    write_state(workdir, state)
    measure = pipeline_eval.StageMeter(plan, workdir)
    for stage in STAGES:
        if stage in state["stages"]:
            continue
        t0 = time.time()
        if stage == "label":
            log(f"== stage label: pairs from the SFT model's samples, judged by {plan.task}")
            result = label_stage(plan, workdir, progress)
            command = f"fmzoo label --model {stage_dir(workdir, 'sft')} --judge {plan.task} " \
                      f"--data {plan.task} --out {stage_dir(workdir, 'label')}/train.jsonl"
        else:
            argv = stage_command(plan, stage, workdir, progress)
            command = "fmzoo " + " ".join(argv)
            log(f"== stage {stage}: {command}")
            _run_command(argv, stage, resume)
            result = {}
        trained = time.time() - t0
        result.update(measure(stage))
        result.update(stage=stage, command=command, train_seconds=round(trained, 1),
                      seconds=round(time.time() - t0, 1))
        state["stages"][stage] = result
        write_state(workdir, state)
        log(pipeline_eval.stage_line(result))
        if stage == stop_after:
            break
    return pipeline_eval.write_report(workdir, state)
