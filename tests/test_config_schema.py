"""The run-settings schema: one declaration per knob, the CLI generated from it (each option
once, with help and one default), range and type checks with the option and the fix in the
message, the JSON round trip, and a new command adding one section."""

import argparse
import dataclasses
import json
import re

import pytest

from fmzoo.models.config import ConfigError
from fmzoo.train import config as C

FLAGS = ["--model", "--data", "--workdir", "--steps", "--batch-size", "--seq-len", "--src-len",
         "--tgt-len", "--lr", "--warmup", "--weight-decay", "--clip-norm", "--accum", "--mesh",
         "--pmap", "--resume", "--eval-every", "--eval-batches", "--save-every", "--keep",
         "--log-every", "--seed", "--sample-prompt", "--sample-tokens", "--data-dir",
         "--data-opt", "--tokenizer", "--sync-save", "--no-progress", "--dtype", "--remat"]


def parser(cls=C.Settings):
    p = argparse.ArgumentParser(prog="fmzoo train")
    C.add_arguments(p, cls)
    return p


def parse(*argv, cls=C.Settings):
    return C.from_args(parser(cls).parse_args(["--workdir", "w", *argv]))


def test_help_shows_every_option_once_with_help_and_one_default():
    text = parser().format_help()
    for flag in FLAGS:
        assert len(re.findall(rf"^\s+{flag}(?=[\s,])", text, re.M)) == 1, flag
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    assert flat.count("(default: 'gpt-tiny')") == 1 and "(default: 0.1)" in flat
    for action in parser()._actions:
        assert action.help and action.help.strip(), action.dest  # no option without help
        assert (action.help or "").count("(default") <= 1


def test_cli_maps_onto_the_sections():
    s = parse("--model", "llama-tiny", "--keep", "2", "--sync-save", "--no-progress",
              "--data-opt", "max_files=3", "--dtype", "bfloat16", "--remat", "full",
              "--eval-every", "0", "n_layers=2", "dropout=0.1")
    assert s.model.source == "llama-tiny" and s.checkpoint.keep == 2
    assert s.checkpoint.async_save is False and s.run.progress is False
    assert s.data.options == {"max_files": 3} and s.eval.every == 0
    assert s.model.config_overrides() == {"n_layers": 2, "dropout": 0.1, "dtype": "bfloat16",
                                          "remat": "full"}
    assert parse().model.config_overrides() == {}  # --dtype/--remat not given: model's own


@pytest.mark.parametrize("argv, message", [
    (["--keep", "0"], "--keep (settings checkpoint.keep) must be >= 1, got 0; pass --keep 1"),
    (["--eval-batches", "0"], "--eval-batches (settings eval.batches) must be >= 1, got 0"),
    (["--lr", "-0.1"], "--lr (settings optim.lr) must be >= 0, got -0.1"),
    (["--warmup", "-1"], "--warmup (settings optim.warmup) must be >= 0, got -1"),
    (["--eval-every", "-5"], "--eval-every (settings eval.every) must be >= 0, got -5"),
    (["--save-every", "0"], "--save-every (settings checkpoint.save_every) must be >= 1"),
    (["--log-every", "0"], "--log-every (settings run.log_every) must be >= 1"),
    (["--steps", "0"], "--steps (settings run.steps) must be >= 1"),
    (["--accum", "0"], "--accum (settings optim.accum) must be >= 1"),
    (["--lr", "nan"], "--lr (settings optim.lr) must be a finite number"),
    (["--pmap", "--mesh", "data=8"], "--pmap and --mesh data=8 exclude each other"),
    (["--sample-prompt", "caf\udce9"], "--sample-prompt (settings eval.sample_prompt) is not "
                                       "valid UTF-8"),
    (["n_layers"], "override 'n_layers' is not key=value"),
    (["--data-opt", "max_files"], "--data-opt 'max_files' is not key=value"),
])
def test_bad_values_are_refused_with_the_option_and_the_fix(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(*argv)
    assert message in str(e.value), str(e.value)


def test_argparse_refuses_non_numbers_with_the_option_name(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--workdir", "w", "--keep", "three"])
    assert "argument --keep: 'three' is not an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["--workdir", "w", "--dtype", "fp8"])
    assert "argument --dtype: invalid choice: 'fp8'" in capsys.readouterr().err


def test_types_are_checked_for_settings_made_in_python_or_json():
    with pytest.raises(ConfigError, match=r"--batch-size .* must be int, got bool True"):
        C.DataSection(batch_size=True)
    with pytest.raises(ConfigError, match=r"--keep .* must be int, got str '3'"):
        C.CheckpointSection(keep="3")
    with pytest.raises(ConfigError, match=r"--seq-len .* must be int, got float 1.5"):
        C.DataSection(seq_len=1.5)
    with pytest.raises(ConfigError, match=r"--pmap .* must be bool, got int 1"):
        C.MeshSection(pmap=1)
    with pytest.raises(ConfigError, match=r"--workdir is required; pass --workdir DIR"):
        C.Settings()
    with pytest.raises(ConfigError, match=r"--workdir is empty"):
        C.RunSection(workdir=" ")
    assert C.OptimSection(lr=1).lr == 1  # an int is a fine float


def test_json_round_trip_and_unknown_keys():
    s = parse("--lr", "0.01", "--mesh", "data=4,tensor=2", "n_heads=2")
    d = json.loads(s.to_json())
    assert C.Settings.from_dict(d) == s
    with pytest.raises(ConfigError, match=r"section 'optim' has no field\(s\) \['learning_rate'\]"):
        C.Settings.from_dict({**d, "optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match=r"settings have no section\(s\) \['sft'\]"):
        C.Settings.from_dict({**d, "sft": {}})
    with pytest.raises(ConfigError, match=r"settings must be a JSON object, got list"):
        C.Settings.from_dict([1])
    assert "resume" not in s.stored()["run"] and "progress" not in s.stored()["run"]
    assert s.replace(optim=dict(lr=0.5)).optim.lr == 0.5
    with pytest.raises(ConfigError, match="--keep"):
        s.replace(checkpoint=dict(keep=0))


def test_checks_against_the_model_and_the_checkpoint():
    class Model:
        family, max_len = "lm", 64

    class Seq2Seq:
        family, max_len = "seq2seq", 64
    s = parse("--sample-tokens", "65")
    with pytest.raises(ConfigError, match=r"--sample-tokens 65 is more than the model's "
                                          r"max_len=64; pass --sample-tokens 64 or less"):
        C.check_with_model(s, Model())
    C.check_with_model(parse("--sample-tokens", "64"), Model())
    C.check_with_model(s, Seq2Seq())  # its sample follows the target's length
    with pytest.raises(ConfigError, match=r"--resume --steps 5: the checkpoint is already at "
                                          r"step 8; pass --steps 9 or more"):
        C.check_resume(parse("--steps", "5", "--resume"), 8)
    C.check_resume(parse("--steps", "8", "--resume"), 8)


@dataclasses.dataclass(frozen=True)
class DPOSection(C.Section):
    NAME = "dpo"
    beta: float = C.setting(0.1, "KL strength of the DPO loss", min=0.0)
    reference: str | None = C.setting(None, "reference model; when not given, --model")


@dataclasses.dataclass(frozen=True)
class DPOSettings(C.Settings):
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)


def test_a_new_command_adds_one_section():
    s = parse("--beta", "0.5", "--lr", "1e-4", cls=DPOSettings)
    assert isinstance(s, DPOSettings) and s.dpo.beta == 0.5 and s.optim.lr == 1e-4
    assert C.Settings.sections().keys() < DPOSettings.sections().keys()
    assert DPOSettings.from_dict(s.to_dict()) == s
    assert "KL strength of the DPO loss (default: 0.1)" in " ".join(
        parser(DPOSettings).format_help().split())
    with pytest.raises(ConfigError, match=r"--beta \(settings dpo.beta\) must be >= 0"):
        parse("--beta", "-1", cls=DPOSettings)
