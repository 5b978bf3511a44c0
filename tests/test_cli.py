"""The `fmzoo` command line: help, the zoo table, a forward pass per family."""

import pytest

from fmzoo.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("models", "forward", "generate", "train"))


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["preset", "family", "params", "layers", "d_model", "heads"]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["gpt2-124m"][1:] == ["gpt2", "124,439,808", "12", "768", "12"]
    assert rows["llama-3.2-1b"][1:] == ["llama", "1,235,814,400", "16", "2048", "32"]
    assert rows["rnn-seq2seq"][1] == "rnn"


def test_forward_runs_every_family(capsys):
    assert main(["forward", "--length", "6"]) == 0
    out = capsys.readouterr().out
    for name in ["rnn-seq2seq", "rnn-seq2seq-attn", "transformer-seq2seq", "gpt-tiny", "llama-tiny"]:
        assert name in out
    assert "finite=False" not in out
