"""`fmzoo run` (train/pipeline.py): the plan's checks, the stage commands, the refusals before
any work, and a whole tiny pipeline interrupted after a stage and resumed."""

import json
import os

import pytest

from fmzoo.cli import build_parser, main
from fmzoo.train import pipeline
from fmzoo.train.pipeline import Plan

TINY = dict(overrides=("n_layers=1", "d_model=64", "n_heads=4", "n_kv_heads=2", "d_ff=128"),
            pretrain_steps=2, pretrain_batch=8, pretrain_seq_len=32, sft_steps=60,
            sft_batch=16, sft_lr=3e-3, max_length=40, max_new_tokens=4, label_prompts=32,
            label_valid_prompts=16, label_temperature=1.5, dpo_steps=2, dpo_batch=8,
            grpo_steps=2, grpo_batch=8, grpo_generations=4, eval_examples=8)
# counting letters in words of at most 3: a task a 60-step model answers right part of the
# time (most counts are 1), so its own samples give preference pairs and GRPO groups a signal
TEST_PLAN = dict(TINY, task="tasks/count", task_options=("max_word=3",), max_length=72,
                 max_new_tokens=3)


@pytest.mark.parametrize("change, message", [
    (dict(grpo_batch=12, grpo_generations=8), "--grpo-batch 12 must be a multiple of"),
    (dict(sft_steps=0), "--sft-steps must be a positive integer"),
    (dict(max_new_tokens=48, max_length=48), "--max-new-tokens 48 must be below"),
    (dict(task_options=("max_word",)), "'max_word' is not KEY=VALUE"),
])
def test_plan_refuses_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        Plan(**change).check()


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "grpo"])
def test_each_stage_is_a_valid_fmzoo_command(stage, tmp_path):
    """Every trainer stage is the command line a user would type (the report prints it)."""
    argv = pipeline.stage_command(Plan(**TINY), stage, str(tmp_path), progress=False)
    args = build_parser().parse_args(argv)
    assert args.command == stage if stage != "pretrain" else args.command == "train"
    got = vars(args)  # the settings schema names options section__field
    assert got["run__workdir"] == os.path.join(str(tmp_path), stage)
    assert got["run__progress"] is False
    if stage == "pretrain":
        assert got["model__overrides"] == list(TINY["overrides"])
    if stage == "grpo":
        assert got["model__source"] == os.path.join(str(tmp_path), "dpo")
        assert got["grpo__num_generations"] == TINY["grpo_generations"]


def test_refusals_before_any_work(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; pass --resume"):
        pipeline.run_pipeline(Plan(**TINY), str(tmp_path / "x"))
    assert os.listdir(tmp_path / "x") == ["keep.txt"]
    with pytest.raises(ValueError, match="holds no pipeline"):
        pipeline.run_pipeline(Plan(**TINY), str(tmp_path / "y"), resume=True)
    assert not (tmp_path / "y").exists()
    state = pipeline.start_state(Plan(**TINY), str(tmp_path / "z"), resume=False)
    os.makedirs(tmp_path / "z")
    pipeline.write_state(str(tmp_path / "z"), state)
    with pytest.raises(ValueError, match=r"other settings \(seed, sft_steps differ\)"):
        pipeline.run_pipeline(Plan(**{**TINY, "sft_steps": 3, "seed": 1}), str(tmp_path / "z"),
                              resume=True)


def test_cli_refuses_a_bad_option_with_one_line(tmp_path, capsys):
    assert main(["run", "--workdir", str(tmp_path / "w"), "--grpo-batch", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grpo-batch 7 must be a multiple of --grpo-generations 8")
    assert not (tmp_path / "w").exists()


def test_report_table_and_json(tmp_path):
    from fmzoo.train import pipeline_eval
    stages = [{"stage": "sft", "exact_match": 0.5, "mean_reward": 0.25, "eval_loss": 1.0,
               "preference_accuracy": None, "seconds": 12.0, "command": "fmzoo sft ..."}]
    text = pipeline_eval.table(stages)
    assert text.splitlines()[2] == "| sft | 0.500 | 0.250 | - | 1.000 | 12 |"
    (tmp_path / "sft").mkdir()
    report = pipeline_eval.write_report(str(tmp_path), {"plan": {}, "stages": {"sft": stages[0]}})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["stages"][0]["exact_match"] == 0.5 and saved["total_seconds"] == 12.0
    assert saved["complete"] is False
    assert saved["targets"][0] == {"target": "total seconds <= 300", "value": 12.0,
                                   "goal": 300.0, "met": True, "gap": 0.0}
    assert report["figure"] == str(tmp_path / "report.png") and os.path.getsize(report["figure"])


def test_tiny_pipeline_interrupted_and_resumed(tmp_path, monkeypatch):
    """The whole road on a tiny model: stopped after SFT, resumed to the end; every stage a
    workdir fmzoo.load accepts; the report holds every stage, measured."""
    import fmzoo
    monkeypatch.setenv("FMZOO_DATA_DIR", str(tmp_path / "data"))
    corpus = tmp_path / "notes.txt"  # a small corpus: its dataset builds in a second
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300)))
    plan = Plan(**TEST_PLAN, corpus=str(corpus))
    w = str(tmp_path / "run")
    first = pipeline.run_pipeline(plan, w, progress=False, stop_after="sft")
    assert [s["stage"] for s in first["stages"]] == ["pretrain", "sft"]
    assert not first["complete"]
    with pytest.raises(ValueError, match="is not empty"):
        pipeline.run_pipeline(plan, w, progress=False)
    report = pipeline.run_pipeline(plan, w, resume=True, progress=False)
    assert report["complete"]
    assert [s["stage"] for s in report["stages"]] == list(pipeline.STAGES)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["stages"][:2] == first["stages"]  # resumed: finished stages are not rerun
    by = {s["stage"]: s for s in saved["stages"]}
    assert by["label"]["pairs"] >= 1 and by["label"]["valid_pairs"] >= 1
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        assert 0.0 <= by[stage]["exact_match"] <= 1.0 and by[stage]["seconds"] > 0
        assert by[stage]["command"].startswith("fmzoo ")
        assert fmzoo.load(os.path.join(w, stage)).config.n_layers == 1
    assert by["sft"]["preference_accuracy"] is None
    assert 0.0 <= by["dpo"]["preference_accuracy"] <= 1.0
    assert saved["total_seconds"] == pytest.approx(sum(s["seconds"] for s in saved["stages"]),
                                                   abs=0.2)
    assert os.path.getsize(os.path.join(w, "report.png")) > 0


def test_targets_say_how_far_each_is():
    from fmzoo.train.pipeline_eval import targets
    by = {"pretrain": {"exact_match": 0.0}, "sft": {"exact_match": 0.25},
          "dpo": {"exact_match": 0.25, "preference_accuracy": 0.9},
          "grpo": {"exact_match": 0.2}}
    got = {t["target"]: t for t in targets(by, 320.0)}
    assert got["total seconds <= 300"]["met"] is False
    assert got["total seconds <= 300"]["gap"] == -20.0
    assert got["SFT exact match - base exact match >= 0.30"]["gap"] == 0.05
    assert got["DPO held-out preference accuracy >= 0.8"]["met"] is True
    assert got["DPO exact match >= SFT exact match"]["met"] is True
    assert got["GRPO exact match > DPO exact match"]["met"] is False
