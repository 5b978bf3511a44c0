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


def test_help_does_not_import_jax():
    import subprocess
    import sys
    code = ("import sys\nfrom fmzoo.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['export', '--help'],"
            " ['generate', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "main([])\n"
            "assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'jax imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "examples:" in out.stdout and "fmzoo export --model runs/gpt-tiny" in out.stdout
    assert "fmzoo eval --model runs/gpt-tiny --data python_docs" in out.stdout


@pytest.mark.parametrize("beams", ["0", "-2"])
def test_generate_refuses_beams_below_one_as_the_api_does(beams, capsys):
    import fmzoo
    from fmzoo.infer import generate
    assert main(["generate", "--model", "gpt-tiny", "--prompt", "hi", "--beams", beams]) == 2
    err = capsys.readouterr().err.strip()
    model, params, _, _ = fmzoo.load("gpt-tiny")
    with pytest.raises(ValueError) as api:
        generate(model, params, [[1, 2]], max_new_tokens=4, num_beams=int(beams))
    assert err == f"error: {api.value}" == f"error: num_beams must be an integer >= 1, got {beams}"


def test_load_a_preset_honours_dtype_and_refuses_unknown_fields():
    import jax
    import jax.numpy as jnp

    import fmzoo
    from fmzoo.models.config import ConfigError
    loaded = fmzoo.load("gpt-tiny", dtype="bfloat16", n_layers=1)
    assert (loaded.config.dtype, loaded.config.param_dtype, loaded.config.n_layers) == (
        "bfloat16", "bfloat16", 1)
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ConfigError, match="LMConfig has no field 'n_layer'; did you mean n_layers"):
        fmzoo.load("gpt-tiny", n_layer=1)
    with pytest.raises(ConfigError, match="unknown dtype 'bf16'"):
        fmzoo.load("gpt-tiny", dtype="bf16")
    a, b = (fmzoo.load("gpt-tiny", rng=s).params["embed"]["embedding"] for s in (0, 1))
    assert not jnp.array_equal(a, b)
    assert jnp.array_equal(a, fmzoo.load("gpt-tiny").params["embed"]["embedding"])
