"""Generation defaults from checkpoints: EOS id lists and generation_config.json, kept through
load and export, and used by `fmzoo generate` unless a flag overrides them."""

import json
import os

import pytest

import fmzoo
from fmzoo.models.generation import GenerationConfigError, GenerationDefaults

SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9}


def test_from_hf_follows_transformers_semantics():
    d = GenerationDefaults.from_hf({"eos_token_id": [7, 9]}, None)
    assert (d.eos_ids, d.eos_id, d.temperature, d.top_k, d.top_p) == ((7, 9), [7, 9], 0.0, 0, 1.0)
    # generation_config.json wins over config.json; do_sample false is greedy whatever
    # temperature says
    d = GenerationDefaults.from_hf({"eos_token_id": 3},
                                   {"eos_token_id": 4, "temperature": 0.5, "top_k": 9})
    assert (d.eos_ids, d.temperature, d.top_k, d.top_p, d.do_sample) == ((4,), 0.0, 0, 1.0, False)
    d = GenerationDefaults.from_hf({"eos_token_id": 3}, SAMPLING)
    assert (d.eos_ids, d.temperature, d.top_k, d.top_p) == ((3,), 0.7, 5, 0.9)
    # transformers' own defaults fill what a sampling config leaves out (top_k 50)
    d = GenerationDefaults.from_hf({}, {"do_sample": True})
    assert (d.eos_ids, d.temperature, d.top_k, d.top_p) == ((), 1.0, 50, 1.0)
    assert GenerationDefaults.from_hf({}, d.to_hf()) == d
    with pytest.raises(GenerationConfigError, match="eos_token_id must be a non-negative int"):
        GenerationDefaults.from_hf({"eos_token_id": ["2"]}, None)


def test_for_config_is_greedy_with_the_config_eos():
    loaded = fmzoo.load("gpt-tiny")
    assert loaded.generation == GenerationDefaults(eos_ids=(loaded.config.eos_id,))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """gpt-tiny written as a Hugging Face dir whose config.json lists two EOS ids and whose
    generation_config.json samples."""
    from fmzoo.models.hf import to_hf
    d = str(tmp_path_factory.mktemp("hf") / "gpt")
    loaded = fmzoo.load("gpt-tiny")
    to_hf(loaded.params, loaded.config, d, tokenizer=loaded.tokenizer)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = [11, 12]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(SAMPLING, f)
    return d


def test_hf_dir_keeps_the_eos_list_and_the_sampling_defaults(hf_dir):
    loaded = fmzoo.load(hf_dir)
    assert loaded.config.eos_id == 11
    assert loaded.generation.eos_ids == (11, 12)
    assert (loaded.generation.temperature, loaded.generation.top_k,
            loaded.generation.top_p) == (0.7, 5, 0.9)


def test_export_round_trips_the_generation_config(hf_dir, tmp_path):
    from transformers import GenerationConfig

    from fmzoo.cli_export import export
    out = export(hf_dir, str(tmp_path / "out"))
    again = fmzoo.load(out)
    assert again.generation == fmzoo.load(hf_dir).generation
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == [11, 12]
    hf = GenerationConfig.from_pretrained(out)
    assert (hf.eos_token_id, hf.do_sample, hf.temperature, hf.top_k, hf.top_p) == (
        [11, 12], True, 0.7, 5, 0.9)


def test_a_workdir_trained_from_it_keeps_the_generation_config(hf_dir, tmp_path):
    """HF dir -> training workdir -> load / export: the EOS list and the sampling defaults
    are those of the weights the run started from, not the config's one id."""
    from train_helpers import ListBatches, batches

    from fmzoo.cli_export import export
    from fmzoo.train.config import Settings
    from fmzoo.train.losses import make_loss
    from fmzoo.train.pretrain import starting_point
    from fmzoo.train.trainer import Task, Trainer
    work = str(tmp_path / "w")
    settings = Settings.from_dict({
        "model": {"source": hf_dir}, "optim": {"lr": 1e-3, "warmup": 0},
        "mesh": {"spec": "data=8"}, "checkpoint": {"save_every": 1},
        "eval": {"every": 0, "sample_tokens": 0},
        "run": {"workdir": work, "steps": 1, "progress": False}})
    config, params, tok, info = starting_point(settings)
    data = batches("gpt", 1)
    task = Task(loss_fn=make_loss(fmzoo.build(config), config), batches=ListBatches(data))
    Trainer(settings, config, task, init_params=params, init_info=info, tokenizer=tok).run()
    source = fmzoo.load(hf_dir).generation
    assert fmzoo.load(work).generation == source and source.eos_ids == (11, 12)
    out = export(work, str(tmp_path / "out"))
    assert fmzoo.load(out).generation == source
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [11, 12]


def _record_stream(monkeypatch):
    import fmzoo.infer
    seen = {}

    def fake_stream(model, params, ids, **kw):
        seen.update(kw)
        return iter([])
    monkeypatch.setattr(fmzoo.infer, "stream", fake_stream)
    return seen


def test_cli_defaults_come_from_generation_config_unless_a_flag_overrides(
        hf_dir, monkeypatch, capsys):
    from fmzoo.cli import main
    seen = _record_stream(monkeypatch)
    assert main(["generate", "--model", hf_dir, "--prompt", "a"]) == 0
    assert {k: seen[k] for k in ("temperature", "top_k", "top_p", "eos_id", "max_new_tokens")} == {
        "temperature": 0.7, "top_k": 5, "top_p": 0.9, "eos_id": [11, 12], "max_new_tokens": 64}
    seen.clear()
    assert main(["generate", "--model", hf_dir, "--prompt", "a", "--temperature", "0",
                 "--top-k", "3", "--eos-id", "4", "--repetition-penalty", "1.3"]) == 0
    assert {k: seen[k] for k in ("temperature", "top_k", "top_p", "eos_id",
                                 "repetition_penalty")} == {
        "temperature": 0.0, "top_k": 3, "top_p": 0.9, "eos_id": 4, "repetition_penalty": 1.3}
    seen.clear()
    assert main(["generate", "--model", hf_dir, "--prompt", "a", "--no-eos"]) == 0
    assert seen["eos_id"] is None
