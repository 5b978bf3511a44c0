"""`fmzoo train` from the command line: a short pmap run of a GPT on the embedded corpus
(loss falls, a sample is printed, a checkpoint and the loss plot are saved), the generated
help, and one clear error per bad flag."""

import pytest

from fmzoo.cli import main
from fmzoo.train.checkpoint import Checkpointer
from fmzoo.train.metrics import read_metrics

SMALL = ["--data-opt", "max_files=20", "--no-progress", "n_layers=1", "d_model=32", "d_ff=64"]


def test_train_command_end_to_end_with_pmap(tmp_path, capsys):
    work = tmp_path / "gpt"
    rc = main(["train", "--model", "gpt-tiny", "--data", "python_docs", "--workdir", str(work),
               "--steps", "40", "--batch-size", "16", "--seq-len", "64", "--lr", "1e-2",
               "--warmup", "5", "--eval-every", "40", "--save-every", "40", "--eval-batches",
               "1", "--sample-tokens", "8", "--pmap", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0
    assert "step 40: eval loss" in out and "sample: 'def " in out and "done: step 40" in out
    assert f"loss curve: {work / 'loss.png'}" in out  # drawn by the CLI after the run
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses = [r["loss"] for r in read_metrics(work) if "loss" in r]
    assert len(losses) == 40 and losses[-1] < losses[0] - 1.5, losses  # ln(264) ~ 5.6 at start
    assert Checkpointer(str(work)).latest_step() == 40


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "data=3"], "has 3 devices but 8 are available"),
    (["--data", "no_such_data"], "unknown dataset 'no_such_data'"),
    (["--seq-len", "512"], "--seq-len 512 is longer than the model's maximum length max_len=256"),
    (["n_layer=2"], "has no field(s) ['n_layer']"),
    (["--batch-size", "12"], "not divisible by data*fsdp = 8"),
    (["--keep", "0"], "--keep (settings checkpoint.keep) must be >= 1, got 0"),
    (["--pmap", "--mesh", "data=8"], "--pmap and --mesh data=8 exclude each other"),
    (["--sample-tokens", "300"], "--sample-tokens 300 is more than the model's max_len=256"),
    (["--remat", "dots", "--model", "rnn-seq2seq"], "has no field(s) ['remat']"),
])
def test_bad_flags_exit_with_one_clear_error(tmp_path, capsys, flags, message):
    work = tmp_path / "w"
    rc = main(["train", "--workdir", str(work), "--steps", "2", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not work.exists()


def test_help_is_generated_with_one_default_each(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "--remat {none,full,dots}" in out and "--dtype {float32,bfloat16,float16}" in out
    assert out.count("--sample-tokens N tokens sampled at each evaluation (0 = no sample) "
                     "(default: 96)") == 1
