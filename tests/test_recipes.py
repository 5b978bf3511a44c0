"""Per-preset training recipes (models/recipes.py): with its default recipe every seq2seq
preset learns small reversal and copy tasks, and the encoder-decoder transformer learns
reversal at least as well as the RNN with attention (issue 15: at the old 3e-3 / 100
warm-up it stayed at ln 26). Plus: the rsqrt schedule is the paper's formula, a user's flag
beats the recipe, the run record holds the resolved numbers, and --resume keeps them."""

import json
import math

import jax
import numpy as np
import pytest

from fmzoo.models import build, get_config
from fmzoo.models.recipes import RECIPES, recipe_for
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train import config as C
from fmzoo.train.data import seq2seq_batches
from fmzoo.train.datasets import algorithmic_examples
from fmzoo.train.losses import make_loss
from fmzoo.train.mesh import make_mesh, put_batch
from fmzoo.train.optim import lr_schedule, make_optimizer
from fmzoo.train.state import sharded_init
from fmzoo.train.step import make_train_step

LN26 = math.log(26)
STEPS, BATCH, LAST, MAX_LEN = 200, 32, 10, 4  # short strings, full preset architectures
SEQ2SEQ = ("rnn-seq2seq", "rnn-seq2seq-attn", "transformer-seq2seq")


@pytest.fixture(scope="module")
def held_out_losses():
    """{(preset, task): held-out loss} after STEPS steps on the preset's default recipe.
    Every batch is new data (STEPS * BATCH distinct training examples, one pass, no
    dropout in these presets), so the loss a step reports, computed before it updates on
    that batch, is a held-out loss: the mean of the last LAST steps' is the measure, and no
    eval step needs compiling. One compiled step per preset serves both tasks."""
    tok, mesh = ByteTokenizer(), make_mesh("data=1", jax.devices()[:1])
    out = {}
    for preset in SEQ2SEQ:
        config, recipe = get_config(preset), recipe_for(preset)
        model = build(config)
        tx = make_optimizer(recipe["lr"], STEPS, warmup_steps=recipe["warmup"],
                            schedule=recipe["schedule"])
        state0, shardings = sharded_init(config, tx, mesh, 0)
        step = make_train_step(make_loss(model, config), tx, mesh, shardings, donate=False)
        for task in ("reverse", "copy"):
            drawn = algorithmic_examples(task, "train", min_len=3, max_len=MAX_LEN,
                                         num_train=2 * STEPS * BATCH, num_test=1, seed=0)
            pairs = list(dict(drawn).items())[:STEPS * BATCH]  # each source once
            assert len(pairs) == STEPS * BATCH
            it = seq2seq_batches(pairs, tok, batch_size=BATCH, seed=0, num_epochs=1,
                                 src_len=MAX_LEN, tgt_len=MAX_LEN + 1)
            state, losses = state0, []
            for _ in range(STEPS):
                state, m = step(state, put_batch(next(it), mesh))
                losses.append(m["loss"])
            out[preset, task] = float(np.mean(jax.device_get(losses[-LAST:])))
    return out


@pytest.mark.parametrize("task", ["reverse", "copy"])
@pytest.mark.parametrize("preset", SEQ2SEQ)
def test_default_recipe_learns(held_out_losses, preset, task):
    # ln 26 ~ 3.26 is knowing only that a letter comes; well below means it reads the source
    assert held_out_losses[preset, task] < 0.5 * LN26, held_out_losses


def test_transformer_reverses_at_least_as_well_as_rnn_attention(held_out_losses):
    tf, rnn = (held_out_losses[p, "reverse"] for p in ("transformer-seq2seq",
                                                       "rnn-seq2seq-attn"))
    assert tf <= rnn, held_out_losses


# ------------------------------------------------------------------ the recipe mechanics


def test_rsqrt_schedule_is_the_papers_formula_scaled_to_its_peak():
    d, w = 512, 4000
    paper = lambda n: d ** -0.5 * min(n ** -0.5, n * w ** -1.5)  # noqa: E731  (n from 1)
    peak = paper(w)
    sched = lr_schedule(3e-3, 10**6, w, kind="rsqrt")
    for count in (0, 1, 99, w - 2, w - 1, w, 3 * w, 10**5):
        want = 3e-3 * paper(count + 1) / peak
        assert float(sched(count)) == pytest.approx(want, rel=1e-5), count
    assert float(sched(w - 1)) == pytest.approx(3e-3, rel=1e-6)  # the peak is --lr
    # --lr 512^-0.5 * 4000^-0.5 is the paper's schedule exactly
    exact = lr_schedule(peak, 10**6, w, kind="rsqrt")
    assert [float(exact(c)) for c in (0, 2000, 40000)] == pytest.approx(
        [paper(1), paper(2001), paper(40001)], rel=1e-5)
    assert RECIPES["transformer-base"]["lr"] == pytest.approx(peak, rel=0.01)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        lr_schedule(1.0, 10, kind="linear")


def test_with_recipe_fills_only_what_the_user_left_out():
    s = C.Settings(run=C.RunSection(workdir="w"))
    assert (s.optim.lr, s.optim.warmup, s.optim.schedule) == (None, None, None)
    r = {"lr": 1e-3, "warmup": 7, "schedule": "rsqrt", "why": "ignored"}
    full = C.with_recipe(s, r).optim
    assert (full.lr, full.warmup, full.schedule) == (1e-3, 7, "rsqrt")
    mine = C.with_recipe(s.replace(optim=dict(lr=0.5, schedule="cosine")), r).optim
    assert (mine.lr, mine.warmup, mine.schedule) == (0.5, 7, "cosine")
    with pytest.raises(ValueError, match="--schedule .* must be one of cosine, rsqrt"):
        C.OptimSection(schedule="linear")


def test_recipe_for_presets_configs_and_unknown_names():
    assert {k: recipe_for("gpt-tiny")[k] for k in ("lr", "warmup", "schedule")} == \
        {"lr": 3e-3, "warmup": 100, "schedule": "cosine"}
    assert set(RECIPES) == set(__import__("fmzoo.models.registry",
                                          fromlist=["PRESETS"]).PRESETS)
    post, pre = (recipe_for(get_config("transformer-seq2seq", pre_ln=v))
                 for v in (False, True))
    assert post["lr"] < pre["lr"] < 3e-3 and post["warmup"] >= 100
    with pytest.raises(ValueError, match="unknown model preset 'gpt-tinny'"):
        recipe_for("gpt-tinny")


def _prepare(work, *flags):
    """`fmzoo train`'s settings from the command line, and its prepared Trainer (no step)."""
    import argparse

    from fmzoo.train.pretrain import prepare
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    args = parser.parse_args([
        "--model", "rnn-seq2seq", "--data", "algorithmic/reverse", "--seq-len", "24",
        "--workdir", str(work), "--steps", "1000", "--no-progress", *flags])
    return prepare(C.from_args(args))


def test_user_flag_beats_the_recipe_and_the_record_holds_numbers(tmp_path):
    from fmzoo.train.pretrain import resolve_recipe
    want = recipe_for("rnn-seq2seq")
    work = tmp_path / "w"
    trainer = _prepare(work, "--lr", "0.05")
    o = trainer.settings.optim
    assert (o.lr, o.warmup, o.schedule) == (0.05, want["warmup"], want["schedule"])
    assert float(trainer.schedule(1)) == pytest.approx(0.05 / want["warmup"], rel=1e-5)
    default = _prepare(tmp_path / "d").settings.optim
    assert (default.lr, default.warmup, default.schedule) == \
        (want["lr"], want["warmup"], want["schedule"])
    work.mkdir()
    trainer._record_run(0)  # what run() writes before its first step
    stored = json.loads((work / "fmzoo_run.json").read_text())["settings"]["optim"]
    assert (stored["lr"], stored["warmup"], stored["schedule"]) == \
        (0.05, want["warmup"], want["schedule"])
    # --resume without flags continues with the run's own numbers, not the preset's
    s = C.Settings.from_dict({"model": {"source": "rnn-seq2seq"},
                              "run": {"workdir": str(work), "resume": True, "steps": 3}})
    o = resolve_recipe(s, get_config("rnn-seq2seq")).optim
    assert (o.lr, o.warmup, o.schedule) == (0.05, want["warmup"], want["schedule"])
    # a workdir as the starting point brings its recipe too
    assert recipe_for(str(work))["lr"] == 0.05
