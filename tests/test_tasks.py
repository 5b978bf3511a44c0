"""Embedded verifiable instruction tasks: splits, answers, checkers, exact match."""

import pytest

from fmzoo.train import tasks

SMALL = {"num_train": 300, "num_validation": 50, "num_test": 100}


@pytest.mark.parametrize("name", ["tasks/add", "tasks/sub", "tasks/reverse", "tasks/sort",
                                  "tasks/count", "tasks/mix"])
def test_splits_disjoint_and_deterministic(name):
    by_split = {s: tasks.examples(name, s, **SMALL) for s in tasks.SPLITS}
    prompts = {s: [e["prompt"] for e in ex] for s, ex in by_split.items()}
    for s, p in prompts.items():
        assert len(p) == len(set(p)), f"duplicate prompts inside {s}"
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["validation"]) & set(prompts["test"])
    n_tasks = len(tasks.task_names(name))
    assert len(prompts["test"]) == 100 * n_tasks
    assert tasks.examples(name, "test", **SMALL) == by_split["test"]  # pure function
    assert tasks.examples(name, "test", **{**SMALL, "seed": 1}) != by_split["test"]


def test_small_space_stays_disjoint():
    # one-digit addition has 100 distinct prompts: train gets what test/validation leave
    k = {"digits": 1, "num_train": 500, "num_validation": 10, "num_test": 20}
    train = {e["prompt"] for e in tasks.task_examples("add", "train", **k)}
    test = {e["prompt"] for e in tasks.task_examples("add", "test", **k)}
    assert len(train) == 100 - 30 and not train & test
    with pytest.raises(ValueError, match="only 100 distinct prompts"):
        tasks.task_examples("add", "train", digits=1, num_test=100, num_validation=0)


def test_answers_are_correct():
    for e in tasks.examples("tasks/mix", "validation", **SMALL):
        p, a = e["prompt"], e["answer"]
        if e["task"] in ("add", "sub"):
            x, op, y = p.removeprefix("What is ").removesuffix("?").partition(
                "+" if e["task"] == "add" else "-")
            assert int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
        else:
            word = p.split("'")[-2]
            if e["task"] == "reverse":
                assert a == word[::-1]
            elif e["task"] == "sort":
                assert a == "".join(sorted(word))
            else:
                assert a == str(word.count(p.split("'")[1]))
    assert {e["task"] for e in tasks.examples("tasks/mix", "test", **SMALL)} == set(
        tasks.TASK_NAMES)


def test_lsd_first_answers_reversed():
    plain = tasks.task_examples("add", "test", **SMALL)
    lsd = tasks.task_examples("add", "test", lsd_first=True, **SMALL)
    assert [e["answer"][::-1] for e in lsd] == [e["answer"] for e in plain]
    assert all("reverse order" in e["prompt"] for e in lsd)


def test_checkers_score_right_and_wrong():
    check = tasks.checker_for("tasks/add")
    assert check("What is 37+58?", "95") == 1.0
    assert check("What is 37+58?", "  95 <|end|>\n") == 1.0
    assert check("What is 37+58?", "96") == 0.0
    assert check("What is 37+58?", "95 95") == 0.0
    assert check("What is 37+58?", "") == 0.0
    assert check({"prompt": "What is 37+58?", "answer": "95"}, "95</s>") == 1.0
    assert tasks.checker_for("reverse")("Reverse the word 'hello'.", "olleh") == 1.0
    assert tasks.checker_for("reverse")("Reverse the word 'hello'.", "hello") == 0.0
    mix = tasks.checker_for("tasks/mix")
    assert mix("How many times does the letter 'l' appear in 'hello'?", "2") == 1.0
    assert mix("Sort the letters of 'hello' alphabetically.", "ehllo") == 1.0
    assert mix("Sort the letters of 'hello' alphabetically.", "ehlol") == 0.0
    assert tasks.checker_for("sub")("What is 58-37? Write the digits of the answer in "
                                    "reverse order.", "12") == 1.0
    with pytest.raises(ValueError, match="is not a prompt of add"):
        check("Reverse the word 'hello'.", "olleh")
    for e in tasks.examples("tasks/mix", "test", **SMALL):
        assert tasks.checker_for(e["task"])(e["prompt"], e["answer"]) == 1.0


def test_exact_match_overall_and_per_task():
    ex = tasks.examples("tasks/mix", "test", num_train=10, num_validation=0, num_test=2)
    completions = [e["answer"] if e["task"] != "add" else "wrong" for e in ex]
    out = tasks.exact_match(ex, completions)
    assert out["exact_match/add"] == 0.0 and out["exact_match/reverse"] == 1.0
    assert out["exact_match"] == pytest.approx(8 / 10)
    with pytest.raises(ValueError, match="one completion per example"):
        tasks.exact_match(ex, completions[:-1])


def test_bad_names_and_knobs():
    with pytest.raises(ValueError, match="unknown task 'tasks/mul'.*tasks/add"):
        tasks.examples("tasks/mul", "train")
    with pytest.raises(ValueError, match=r"unknown task option\(s\) \['digit'\]"):
        tasks.examples("tasks/add", "train", digit=3)
    with pytest.raises(ValueError, match="digits=0 must be in 1..18"):
        tasks.examples("tasks/add", "train", digits=0)
    assert tasks.config_name("tasks/add", {"digits": "3"}) == "add_digits3"
    assert tasks.config_name("tasks/mix", {}) == "mix"
