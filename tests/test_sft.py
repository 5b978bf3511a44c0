"""`fmzoo sft` end to end on tiny models: completion-only labels learn what --loss-on all
cannot, packed == unpacked loss, LoRA runs resume exactly and load merged, exact match on an
embedded task rises far above the base model's, and bad options fail before any work."""

import json
import os
import random

import jax
import numpy as np
import pytest

from fmzoo.models.config import ConfigError
from fmzoo.train.metrics import read_metrics
from fmzoo.train.sft import SFTSettings, prepare_sft, sft_loss

TINY = ["n_layers=1", "d_model=64", "n_heads=4", "n_kv_heads=2", "d_ff=128", "max_len=64"]


def settings(tmp_path, workdir="run", **sections):
    overrides = dict(kv.split("=") for kv in TINY)
    base = dict(model=dict(source="llama-tiny", overrides={k: int(v) for k, v in
                                                           overrides.items()}),
                data=dict(batch_size=16, max_length=48, data_dir=str(tmp_path / "tfds")),
                optim=dict(lr=3e-3, warmup=5), mesh=dict(spec="data=8"),
                checkpoint=dict(save_every=1000, keep=2),
                eval=dict(every=0, batches=1, examples=0, at_start=False),
                run=dict(workdir=str(tmp_path / workdir), steps=4, log_every=1,
                         progress=False))
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return SFTSettings.from_dict(base)


def _constant_completion_file(path, n=200, seed=0):
    rs = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = "".join(rs.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12))
            f.write(json.dumps({"prompt": prompt, "completion": " ok"}) + "\n")
    return str(path)


def test_completion_only_learns_a_constant_answer_that_loss_on_all_cannot(tmp_path):
    data = _constant_completion_file(tmp_path / "const.jsonl")
    done = {}
    for loss_on in ("completion", "all"):
        s = settings(tmp_path, f"run_{loss_on}", data=dict(name=data),
                     optim=dict(lr=1e-2, warmup=3), sft=dict(loss_on=loss_on),
                     run=dict(steps=30))
        done[loss_on] = prepare_sft(s).run()["loss"]
    assert done["completion"] < 0.05  # " ok" + eos after any prompt: learned
    assert done["all"] > 1.0  # random prompt letters cannot be predicted
    rows = [r for r in read_metrics(str(tmp_path / "run_completion")) if "loss" in r]
    assert {"loss", "mean_token_accuracy", "num_tokens"} <= set(rows[0])
    assert rows[-1]["truncated_examples"] == 0  # 16-token examples, --max-length 48
    # num_tokens: every real input token so far (13 prompt + 3 completion + bos/eos - 1)
    assert rows[1]["num_tokens"] == 2 * rows[0]["num_tokens"] == 2 * 16 * 16


def test_packed_loss_equals_unpacked_loss(tmp_path):
    from fmzoo.models.registry import build
    from fmzoo.models.tokenizer import ByteTokenizer
    from fmzoo.train import sft_data
    from fmzoo.train.state import init_train_state
    import optax
    s = settings(tmp_path, model=dict(overrides=dict(n_layers=1, d_model=64, n_heads=4,
                                                     n_kv_heads=2, d_ff=128, max_len=128)))
    config = prepare_sft(s).config
    params = init_train_state(config, optax.sgd(0.1)).params
    loss = jax.jit(sft_loss(build(config), config, deterministic=True))
    totals = {}
    for packing in (False, True):
        it = sft_data.sft_batches("tasks/reverse", ByteTokenizer(), batch_size=8, max_length=96,
                                  split="validation", loss_on="completion", packing=packing,
                                  shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                                  data_dir=str(tmp_path / "tfds"), num_validation=40)
        nll = tokens = rows = 0.0
        for b in it:
            value, m = loss(params, b, None)
            nll += float(value) * float(m["tokens"])
            tokens += float(m["tokens"])
            rows += 1
        totals[packing] = (nll, tokens, rows)
    assert totals[True][1] == totals[False][1] > 0
    np.testing.assert_allclose(totals[True][0], totals[False][0], rtol=1e-5)
    assert totals[True][2] < totals[False][2]  # packing did pack


def test_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="decoder-only"):
        prepare_sft(settings(tmp_path, model=dict(source="rnn-seq2seq", overrides={})))
    with pytest.raises(ConfigError, match="--max-length 65"):
        prepare_sft(settings(tmp_path, data=dict(max_length=65)))
    with pytest.raises(ValueError, match="qkv"):
        prepare_sft(settings(tmp_path, sft=dict(lora_rank=2, lora_targets="qkv")))
    with pytest.raises(ConfigError, match="module:function"):
        prepare_sft(settings(tmp_path, eval=dict(checker="nocolon")))
    assert not os.path.exists(tmp_path / "tfds") and not os.path.exists(tmp_path / "run")


def test_sft_raises_exact_match_far_above_the_base_model_and_dpo_keeps_it(tmp_path):
    """Reversing 3-letter words never seen in training: the random base answers none;
    300 steps of SFT answer most of them (learned positions make the copy easy to find;
    llama-tiny of this size needs several times the steps); DPO then keeps them."""
    s = settings(tmp_path, model=dict(source="gpt-tiny", overrides=dict(
                     n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=64)),
                 data=dict(name="tasks/reverse", batch_size=128, max_length=36,
                           options=dict(min_word=3, max_word=3)),
                 optim=dict(lr=5e-3, warmup=20),
                 eval=dict(every=0, examples=32, at_start=True),
                 run=dict(steps=300, log_every=100))
    summary = prepare_sft(s).run()
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "eval_exact_match" in r]
    assert rows[0]["step"] == 0 and rows[0]["eval_exact_match"] == 0.0  # the base model
    assert rows[-1]["step"] == 300 and summary["eval_exact_match"] >= 0.5, summary

    # then DPO from it (issue 11) with its default recipe, on held-out-disjoint pairs of the
    # same task (the right reversal against two letters swapped): the held-out preference
    # accuracy rises from 0 (policy == reference) and exact match does not fall
    from fmzoo.train.dpo import DPOSettings, dpo
    d = DPOSettings.from_dict(dict(
        model=dict(source=str(tmp_path / "run")), mesh=dict(spec="data=8"),
        data=dict(name="tasks/reverse", batch_size=32, max_length=36,
                  data_dir=str(tmp_path / "tfds"), options=dict(min_word=3, max_word=3)),
        eval=dict(every=0, batches=2, examples=32, at_start=True),
        checkpoint=dict(save_every=1000),
        run=dict(workdir=str(tmp_path / "dpo"), steps=10, log_every=5, progress=False)))
    after = dpo(d)
    evals = [r for r in read_metrics(str(tmp_path / "dpo")) if "eval_exact_match" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_rewards/accuracies"] == 0.0
    assert evals[-1]["eval_rewards/accuracies"] >= 0.6, evals[-1]  # 0.77 measured
    assert evals[0]["eval_exact_match"] == summary["eval_exact_match"]  # the same model
    assert after["eval_exact_match"] >= summary["eval_exact_match"], (after, summary)


def test_sft_killed_with_sigkill_resumes_bit_for_bit(tmp_path):
    """`fmzoo sft` with LoRA killed with SIGKILL right after its first committed checkpoint
    (possibly in the middle of writing the next), then resumed: the same merged weights, bit
    for bit, as a run never interrupted (rsqrt: the schedule does not depend on the total
    steps)."""
    import signal
    import subprocess
    import sys
    import time

    from fmzoo.models.workdir import committed_steps, load_workdir
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fmzoo", "sft", "--model", "llama-tiny", *TINY, "--data",
           "tasks/reverse", "--workdir", str(killed), "--data-dir", str(tmp_path / "tfds"),
           "--batch-size", "16", "--max-length", "48", "--mesh", "data=8", "--lr", "3e-3",
           "--warmup", "5", "--schedule", "rsqrt", "--save-every", "2", "--steps", "100000",
           "--eval-every", "0", "--eval-examples", "0", "--no-eval-at-start", "--no-progress",
           "--lora-rank", "4", "--lora-alpha", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not committed_steps(str(killed / "checkpoints")) and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    last = committed_steps(str(killed / "checkpoints"))[-1]
    assert last < 12
    common = dict(data=dict(name="tasks/reverse"), checkpoint=dict(save_every=2),
                  optim=dict(lr=3e-3, warmup=5, schedule="rsqrt"),
                  sft=dict(lora_rank=4, lora_alpha=8.0))
    whole = prepare_sft(settings(tmp_path, "whole", **common, run=dict(steps=12))).run()
    with pytest.warns(UserWarning, match="which is no longer running"):  # its stale lock
        resumed = prepare_sft(settings(tmp_path, "killed", **common,
                                       run=dict(steps=12, resume=True))).run()
    assert resumed["start_step"] == last and resumed["loss"] == whole["loss"]
    a, b = (load_workdir(str(tmp_path / w)).params for w in ("whole", "killed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # the saved state is {"base", "lora"}; fmzoo.load merges it into a plain model
    import fmzoo
    from fmzoo.models.registry import param_shapes
    from fmzoo.train import checkpoint as ckpt_lib
    with open(os.path.join(tmp_path, "whole", ckpt_lib.RUN_FILE)) as f:
        assert json.load(f)["lora"]["rank"] == 4
    loaded = fmzoo.load(str(tmp_path / "whole"))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, a)
    assert jax.tree.structure(loaded.params) == jax.tree.structure(param_shapes(loaded.config))
    with pytest.raises(ConfigError, match="LoRA"):  # resuming without the adapters
        prepare_sft(settings(tmp_path, "whole", data=dict(name="tasks/reverse"),
                             run=dict(steps=14, resume=True)))
