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
    assert header == ["preset", "family", "params", "layers", "d_model", "heads", "lr",
                      "warmup", "schedule"]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["gpt2-124m"][1:6] == ["gpt2", "124,439,808", "12", "768", "12"]
    assert rows["llama-3.2-1b"][1:6] == ["llama", "1,235,814,400", "16", "2048", "32"]
    assert rows["transformer-base"][6:] == ["0.0007", "4000", "rsqrt"]  # the recipe
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


def _greedy_tokens(n):
    import fmzoo
    from fmzoo.infer import generate
    loaded = fmzoo.load("gpt-tiny")
    ids = loaded.tokenizer.encode("ab", add_bos=True)
    # a random model repeats one token; the penalty makes it move on
    (toks,) = generate(loaded.model, loaded.params, [ids], max_new_tokens=n,
                       repetition_penalty=3.0)
    return loaded, toks


def test_generate_two_eos_ids_stop_at_the_second(capsys):
    loaded, toks = _greedy_tokens(8)
    # the first token that did not appear before it: the stop must come from the list's 2nd id
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])
    other = next(t for t in range(loaded.config.vocab_size) if t not in toks)
    assert main(["generate", "--model", "gpt-tiny", "--prompt", "ab", "--max-new-tokens", "8",
                 "--repetition-penalty", "3", "--eos-id", str(other), "--eos-id", str(toks[k])]) == 0
    assert f", {k + 1} new]" in capsys.readouterr().err
    assert main(["generate", "--model", "gpt-tiny", "--prompt", "ab", "--max-new-tokens", "8",
                 "--repetition-penalty", "3", "--eos-id", f"{other},{toks[k]}"]) == 0
    assert f", {k + 1} new]" in capsys.readouterr().err


@pytest.mark.parametrize("beams", ["1", "2"])
def test_generate_stop_string_cuts_the_output(beams, capsys):
    base = ["generate", "--model", "gpt-tiny", "--prompt", "ab", "--max-new-tokens", "12",
            "--no-eos", "--beams", beams]
    assert main(base) == 0
    full = capsys.readouterr().out[:-1]
    stop = full[4:6]
    assert len(stop) == 2
    assert main(base + ["--stop", stop, "--stop", "never seen \u2603"]) == 0
    out = capsys.readouterr().out
    assert out == full[:full.find(stop)] + "\n"


def test_printer_never_shows_part_of_a_stop_string():
    import io

    from fmzoo.cli_generate import _Printer

    class Chars:
        def decode(self, ids):
            return "".join(map(chr, ids))
    out = io.StringIO()
    p = _Printer(Chars(), out, stops=["END"])
    writes = []
    for c in "abcEN":
        assert p.add(ord(c))
        writes.append(out.getvalue())
    assert writes[-1] == "abc"  # 'EN' held back: it may become END
    assert not p.add(ord("D")) and not p.add(ord("x"))
    assert p.finish() == "abc" and out.getvalue() == "abc\n"
    out = io.StringIO()
    p = _Printer(Chars(), out, stops=["END"])
    for c in "abEN":
        p.add(ord(c))
    assert p.finish() == "abEN"  # a stop string's prefix at the end is real output


@pytest.mark.parametrize("argv, message", [
    (["--early-stopping", "maybe"], "--early-stopping 'maybe': choose true, false or never"),
    (["--eos-id", "1,x"], "--eos-id '1,x': token ids are integers"),
])
def test_generate_refuses_bad_flags_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "gpt-tiny", "--prompt", "hi", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=3"], "mesh data=3,fsdp=1,tensor=1 has 3 devices but 8 are available"),
    (["--no-eos", "--eos-id", "3"], "--no-eos and --eos-id exclude each other; drop one"),
    (["--stop", ""], "--stop needs a non-empty string"),
    (["--min-new-tokens", "-1"], "min_new_tokens must be an integer >= 0, got -1"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
])
def test_generate_refuses_bad_values_with_one_message(argv, message, capsys):
    assert main(["generate", "--model", "gpt-tiny", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_generate_on_a_mesh_matches_one_device(capsys):
    base = ["generate", "--model", "gpt-tiny", "--prompt", "ab", "--max-new-tokens", "6",
            "--no-eos", "--min-new-tokens", "2", "--repetition-penalty", "1.2"]
    assert main(base) == 0
    one = capsys.readouterr().out
    assert main(base + ["--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    assert capsys.readouterr().out == one
