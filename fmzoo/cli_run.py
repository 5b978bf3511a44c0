"""`fmzoo run`: the main job. Pretrain a small LM, SFT it, label pairs from its own samples,
DPO, then GRPO, each stage a workdir under --workdir, measured the same way after each stage
(fmzoo.train.pipeline). Offline, on the embedded data."""

from __future__ import annotations

import dataclasses
import sys

HELP = "the whole road on embedded data: pretrain -> SFT -> label -> DPO -> GRPO, measured"

EPILOG = """examples:
  fmzoo run --workdir runs/chapter                 (about 5 minutes on a 2-core CPU)
  fmzoo run --workdir runs/chapter --resume        (continue an interrupted pipeline)
  fmzoo run --workdir runs/big --sft-steps 600 --grpo-steps 100
then, for any stage:
  fmzoo chat --model runs/chapter/grpo;  fmzoo eval --model runs/chapter/sft ...
the report: runs/chapter/report.json, runs/chapter/report.png"""


def add_arguments(p):
    from fmzoo.train.pipeline import Plan
    p.epilog = EPILOG
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="where the stages' workdirs, pairs and report go")
    p.add_argument("--resume", action="store_true",
                   help="continue the pipeline in --workdir at the stage and step it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("the recipe (defaults: the measured 5-minute CPU run)")
    for f in dataclasses.fields(Plan):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "overrides":
            g.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                           help="model config overrides of the base, e.g. n_layers=2")
        elif f.name == "task_options":
            g.add_argument("--task-opt", dest="task_options", action="append", default=[],
                           metavar="KEY=VALUE", help="embedded task option, e.g. max_word=4")
        else:
            g.add_argument(flag, type=type(f.default), default=f.default)


def run(args) -> int:
    from fmzoo.train.pipeline import Plan, run_pipeline
    from fmzoo.train.pipeline_eval import table
    names = {f.name for f in dataclasses.fields(Plan)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["overrides"] = tuple(values.get("overrides") or ())
    values["task_options"] = tuple(values.get("task_options") or ())
    try:
        plan = Plan(**values).check()
        report = run_pipeline(plan, args.workdir, resume=args.resume,
                              progress=not args.no_progress)
    except ValueError as e:  # the models' ConfigError: a bad option, refused before any work
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print()
    print(table(report["stages"]))
    print(f"\ntotal {report['total_seconds']:.0f} s; report: {args.workdir}/report.json, "
          f"figure: {report['figure']}")
    floor = next((s["best_constant_answer"] for s in report["stages"]
                  if s.get("best_constant_answer") is not None), None)
    if floor is not None:
        print(f"the best constant answer scores exact match {floor:.3f} on the same prompts")
    for t in report["targets"]:
        print(f"  target {t['target']}: {t['value']:g} "
              + ("met" if t["met"] else f"MISSED (goal {t['goal']:g}, short by "
                                        f"{abs(t['gap']):g})"))
    for s in report["stages"]:
        if s.get("sample"):
            print(f"  {s['stage']:>8}: {s['sample']}")
    return 0
