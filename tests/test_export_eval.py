"""`fmzoo export` (a workdir as a Hugging Face dir that transformers loads with the same
logits) and `fmzoo eval` (loss, perplexity, accuracy, exact match from the training code)."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import fmzoo
from fmzoo.cli import main
from fmzoo.cli_eval import evaluate
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.train.checkpoint import Checkpointer, write_run_file
from fmzoo.train.mesh import make_mesh
from fmzoo.train.optim import make_optimizer
from fmzoo.train.state import sharded_init

from train_helpers import tiny_config


def make_workdir(work, family: str):
    """A workdir as `fmzoo train` leaves it: run file, tokenizer, one checkpoint."""
    config = tiny_config(family)
    os.makedirs(work)
    state, _ = sharded_init(config, make_optimizer(1e-3, 10), make_mesh("data=8"), 0)
    write_run_file(str(work), config, {})
    ByteTokenizer().save(os.path.join(work, "tokenizer"))
    ckpt = Checkpointer(str(work), async_save=False)
    ckpt.save(state.replace(step=np.asarray(2, state.step.dtype)), {})
    ckpt.close()
    return str(work)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {f: make_workdir(root / f, f) for f in ("gpt", "llama", "rnn")}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_export_loads_in_transformers_with_the_same_logits(workdirs, tmp_path, family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "exported"
    assert main(["export", "--model", workdirs[family], "--out", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model, params, _, _ = fmzoo.load(workdirs[family])
    tokens = np.array([[257, 5, 99, 12, 200, 7, 31, 64]], np.int32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
    assert os.listdir(tmp_path) == ["exported"]  # no temporary directory left behind


def test_export_refuses_a_non_empty_out_unless_forced(workdirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--model", workdirs["gpt"], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --out {out} already exists and is not empty; pass --force "
                           "to replace it, or choose another directory")
    assert os.listdir(out) == ["keep.txt"]
    assert main(["export", "--model", workdirs["gpt"], "--out", str(out), "--force"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "fmzoo_tokenizer.json",
                                       "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_refuses_a_seq2seq_model_without_writing(workdirs, tmp_path, capsys):
    assert main(["export", "--model", workdirs["rnn"], "--out", str(tmp_path / "o")]) == 2
    assert "export writes decoder-only LMs" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_eval_lm_metrics_agree_with_a_direct_loss(workdirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("def add(a, b):\n    return a + b\n" * 60)
    m = evaluate(workdirs["gpt"], "notes.txt", batches=2, batch_size=8, seq_len=32)
    assert m["batches"] == 2 and m["tokens"] == 2 * 8 * 32  # packed rows: every token counts
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    # a direct token-mean cross entropy over the same batches
    from fmzoo.train import data as data_lib
    loaded = fmzoo.load(workdirs["gpt"])
    it = data_lib.lm_batches("notes.txt", loaded.tokenizer, batch_size=8, seq_len=32,
                             split="train", shuffle=False, num_epochs=1)
    nll, n = 0.0, 0
    for _, batch in zip(range(2), it):
        logits = loaded.model.apply({"params": loaded.params}, jnp.asarray(batch["inputs"]),
                                    positions_BT=batch.get("positions"),
                                    segment_ids_BT=batch.get("segment_ids"))
        logp = np.asarray(jax_log_softmax(logits))
        picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        nll -= float((picked * batch["loss_mask"]).sum())
        n += int(batch["loss_mask"].sum())
    assert m["loss"] == pytest.approx(nll / n, rel=1e-4)
    capsys.readouterr()
    assert main(["eval", "--model", workdirs["gpt"], "--data", "notes.txt", "--batches", "2",
                 "--batch-size", "8", "--seq-len", "32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["loss"] == pytest.approx(m["loss"]) and printed["split"] == "train"


def jax_log_softmax(x):
    import jax
    return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)


def test_eval_seq2seq_reports_exact_match(workdirs, capsys):
    assert main(["eval", "--model", workdirs["rnn"], "--data", "algorithmic/reverse",
                 "--batches", "1", "--batch-size", "8", "--seq-len", "24"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[2:])
    assert set(lines) == {"loss", "perplexity", "accuracy", "exact_match", "tokens", "rows",
                          "batches"}
    assert 0.0 <= float(lines["exact_match"]) <= 1.0 and int(lines["rows"]) == 8


def test_eval_refuses_a_mismatched_dataset_and_bad_sizes(workdirs, capsys):
    assert main(["eval", "--model", workdirs["rnn"], "--data", "notes_missing.txt"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["eval", "--model", workdirs["gpt"], "--data", "algorithmic/reverse"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: 'algorithmic/reverse' is a seq2seq dataset but {workdirs['gpt']!r} is a lm "
        "model; pick a matching dataset")
    assert main(["eval", "--model", workdirs["gpt"], "--data", "notes.txt",
                 "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size must be >= 1, got 0"


def test_load_a_workdir_honours_dtype_and_overrides(workdirs, monkeypatch):
    import jax

    from fmzoo.models.config import ConfigError
    loaded = fmzoo.load(workdirs["gpt"], dtype="bfloat16", attention_impl="reference")
    assert (loaded.config.dtype, loaded.config.param_dtype) == ("bfloat16", "bfloat16")
    assert loaded.config.attention_impl == "reference"
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ConfigError, match=r"override\(s\) d_model would change the shapes"):
        fmzoo.load(workdirs["gpt"], d_model=64)
    with pytest.raises(ConfigError, match="LMConfig has no field 'dropuot'; did you mean dropout"):
        fmzoo.load(workdirs["gpt"], dropuot=0.1)
    with pytest.raises(ConfigError, match="rng seeds the random init of a preset, but .* is a "
                                          "training workdir with stored weights; drop rng"):
        fmzoo.load(workdirs["gpt"], rng=1)
    # the CLI passes --dtype through to what it runs: a bf16 run, not a silent fp32 one
    import importlib
    api = importlib.import_module("fmzoo.api")
    seen = []
    real_load = api.load

    def spy(*args, **kw):
        seen.append(real_load(*args, **kw))
        return seen[-1]
    monkeypatch.setattr(api, "load", spy)
    assert main(["generate", "--model", workdirs["gpt"], "--prompt", "a", "--max-new-tokens", "2",
                 "--dtype", "bfloat16"]) == 0
    assert seen[0].config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(seen[0].params)} == {jnp.dtype(jnp.bfloat16)}
