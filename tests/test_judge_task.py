"""tasks/judge: a verifiable task that teaches an LM to judge (RLAIF with a trained judge)."""

import pytest

from fmzoo.train import judges, tasks

SMALL = {"num_train": 40, "num_validation": 10, "num_test": 20}


def _fields(prompt: str) -> dict:
    return tasks.parse_judge_prompt(prompt)


def test_answers_are_right_and_both_orders_appear():
    ex = tasks.examples("tasks/judge", "validation", **SMALL)
    assert len(ex) == 10 * len(tasks.TASK_NAMES)
    assert {e["task"] for e in ex} == {"judge"}
    check = tasks.checker_for("tasks/judge")
    base_tasks = set()
    for e in ex:
        f = _fields(e["prompt"])
        assert e["prompt"] == judges.DEFAULT_TEMPLATE.format(**f)  # exactly the template
        base = [t for t in tasks.TASK_NAMES if _solves(t, f["prompt"])]
        assert len(base) == 1
        base_tasks.add(base[0])
        base_check = tasks.checker_for(base[0])
        right = [base_check(f["prompt"], f[k]) for k in ("first", "second")]
        # the base task's own checker: the answer points at the one right response
        assert sorted(right) == [0.0, 1.0]
        assert e["answer"] == ("1" if right[0] else "2")
        assert check(e["prompt"], e["answer"]) == 1.0
        assert check(e["prompt"], "2" if e["answer"] == "1" else "1") == 0.0
    assert base_tasks == set(tasks.TASK_NAMES)
    answers = [e["answer"] for e in ex]
    assert 0.3 < answers.count("1") / len(answers) < 0.7  # both orders, neither dominant


def _solves(task, prompt):
    try:
        tasks.solve(task, prompt)
        return True
    except ValueError:
        return False


def test_splits_disjoint_deterministic_and_base_knob():
    by_split = {s: [e["prompt"] for e in tasks.examples("tasks/judge", s, **SMALL)]
                for s in tasks.SPLITS}
    for s, p in by_split.items():
        assert len(p) == len(set(p)), s
    assert not set(by_split["train"]) & set(by_split["test"])
    assert not set(by_split["train"]) & set(by_split["validation"])
    assert not set(by_split["validation"]) & set(by_split["test"])
    # the base prompts inside are the base tasks' own splits
    base_test = {e["prompt"] for e in tasks.examples("tasks/mix", "test", **SMALL)}
    assert {_fields(p)["prompt"] for p in by_split["test"]} == base_test
    assert [e["prompt"] for e in tasks.examples("tasks/judge", "test", **SMALL)] == \
        by_split["test"]
    assert tasks.examples("tasks/judge", "test", **{**SMALL, "seed": 1}) != \
        tasks.examples("tasks/judge", "test", **SMALL)
    # one base task: a subset of the mix's judge examples, the same pairs in the same order
    rev = tasks.examples("tasks/judge", "test", base="reverse", **SMALL)
    assert len(rev) == 20 and set(e["prompt"] for e in rev) <= set(by_split["test"])
    assert all(_fields(e["prompt"])["prompt"].startswith("Reverse") for e in rev)
    assert tasks.check_knobs({"base": "sort, add"})["base"] == "add,sort"
    assert tasks.check_knobs({"base": ",".join(tasks.TASK_NAMES)})["base"] == "mix"
    assert tasks.config_name("tasks/judge", {"base": "reverse,add"}) == "judge_baseadd-reverse"
    assert "tasks/judge" in tasks.embedded_names() and "judge" not in tasks.TASK_NAMES


def test_bad_knobs_and_prompts_raise():
    with pytest.raises(ValueError, match=r"base='reverse' applies to tasks/judge only"):
        tasks.examples("tasks/add", "test", base="reverse")
    with pytest.raises(ValueError, match=r"base='judge': the base tasks of tasks/judge are "
                                         r"'mix' or a comma-separated list"):
        tasks.check_knobs({"base": "judge"})
    both = judges.DEFAULT_TEMPLATE.format(prompt="Reverse the word 'abc'.", first="cba",
                                          second="cba")
    with pytest.raises(ValueError, match="needs exactly one right response, but both"):
        tasks.solve("judge", both)
    with pytest.raises(ValueError, match="is not a prompt of task 'judge'"):
        tasks.parse_judge_prompt("Reverse the word 'abc'.")
    with pytest.raises(ValueError, match=r"is not a prompt of judge$"):
        tasks.checker_for("tasks/judge")("Reverse the word 'abc'.", "1")


def test_checker_cleans_like_the_other_tasks():
    e = tasks.examples("tasks/judge", "test", **SMALL)[0]
    check = tasks.checker_for("judge")
    other = "2" if e["answer"] == "1" else "1"
    for good in (e["answer"], f" {e['answer']}\n", f"{e['answer']}<|end|>",
                 f"{e['answer']} <|eot_id|></s>"):
        assert check(e["prompt"], good) == 1.0, good
        assert check({"prompt": e["prompt"], "answer": e["answer"]}, good) == 1.0
    for bad in (other, f"{e['answer']}.", "", f"{e['answer']} {e['answer']}", "12"):
        assert check(e["prompt"], bad) == 0.0, bad
    # exact match groups the judge examples under their own task
    em = tasks.exact_match([e, e], [e["answer"], other])
    assert em == {"exact_match": 0.5, "exact_match/judge": 0.5}


def test_sft_prompt_ids_equal_the_lm_judge_rendering(tmp_path):
    """`fmzoo sft --data tasks/judge` trains on exactly the ids an LMJudge shows its model."""
    from fmzoo.models import get_config
    from fmzoo.models.registry import build
    from fmzoo.models.tokenizer import ByteTokenizer
    from fmzoo.train import sft_data

    tok = ByteTokenizer()
    config = get_config("llama-tiny", max_len=512)
    judge = judges.LMJudge(build(config), None, tok)  # rendering needs no params
    knobs = {"num_train": 3, "num_validation": 2, "num_test": 2, "base": "reverse,add"}
    rows = sft_data.sft_eval_prompts("tasks/judge", tok, "test", 4,
                                     data_dir=str(tmp_path / "tfds"), **knobs)
    ex = tasks.examples("tasks/judge", "test", **knobs)
    assert len(rows) == len(ex) == 4
    # TFDS stores the records shuffled: match each row to its example by the judge's ids
    rendered = {tuple(judge._ids(**_fields(e["prompt"]))): e for e in ex}
    assert len(rendered) == 4
    for row in rows:
        e = rendered[tuple(row["prompt_ids"])]
        assert row["answer"] == e["answer"] and row["task"] == "judge"
        # and the reply SFT teaches opens with the judge's label token of the right answer
        ids, mask = sft_data.encode_record(tok, {"format": "prompt_completion",
                                                 **tasks.as_messages(e)})
        first_label = mask.index(True)
        assert ids[:first_label] == row["prompt_ids"]
        assert ids[first_label] == judge.labels[int(e["answer"]) - 1]


def test_wrong_answers_come_in_three_kinds():
    # near misses (a neighbour swap), one letter substituted, random letters: easy to hard
    kinds = set()
    for e in tasks.examples("tasks/judge", "test", base="reverse", **SMALL, max_word=4,
                            min_word=4):
        f = _fields(e["prompt"])
        right, wrong = (f["first"], f["second"]) if e["answer"] == "1" else \
            (f["second"], f["first"])
        assert len(wrong) == len(right) == 4 and wrong != right
        diff = sum(a != b for a, b in zip(right, wrong))
        kinds.add("swap" if sorted(wrong) == sorted(right) and diff == 2 else
                  "substitution" if diff == 1 else "random")
    assert kinds == {"swap", "substitution", "random"}
