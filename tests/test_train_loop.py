"""The pretraining command on the Trainer, end to end on 8 simulated devices: metrics,
checkpoints, exact resume (also past a torn metrics line), restore onto another mesh,
divergence stop, continued pretraining from a workdir, loading a workdir, and the errors
for bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import fmzoo
from fmzoo.models import get_config, param_shapes
from fmzoo.models.config import ConfigError
from fmzoo.train.checkpoint import Checkpointer, CheckpointError, load_workdir
from fmzoo.train.config import Settings
from fmzoo.train.pretrain import TrainingDiverged, prepare, train
from fmzoo.train.mesh import MeshError, make_mesh
from fmzoo.train.metrics import read_metrics

TINY = dict(n_layers=1, d_model=32, n_heads=4, d_ff=64, max_len=64)


def lm_cfg(workdir, **kw):
    """Settings of a tiny run; keyword arguments are 'section.field' names with '__' for
    the dot (optim__lr=...), or a plain field name of the run section."""
    sections = dict(
        model=dict(source="gpt-tiny", overrides=TINY),
        data=dict(name="python_docs", options={"max_files": 20}, batch_size=8, seq_len=32),
        optim=dict(lr=3e-3, warmup=2), mesh=dict(spec="data=8"),
        checkpoint=dict(save_every=3, keep=5),
        eval=dict(every=3, batches=1, sample_tokens=0),
        run=dict(workdir=str(workdir), steps=6, log_every=1, progress=False))
    for key, value in kw.items():
        section, _, name = key.rpartition("__")
        sections[section or "run"][name] = value
    return Settings.from_dict(sections)


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run killed after step 4 (last checkpoint: step 3)."""
    root = tmp_path_factory.mktemp("loop")
    full = root / "full"
    train(lm_cfg(full))
    killed = root / "killed"
    train(lm_cfg(killed), stop_after=4)
    shutil.copytree(killed, root / "killed_copy")  # for the other-mesh and NaN tests
    return root


def test_run_writes_metrics_checkpoints_and_run_file(runs):
    full = runs / "full"
    rows = read_metrics(full)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"accuracy", "perplexity", "grad_norm", "tokens_seen", "lr",
            "tokens_per_s"} <= set(train_rows[1])
    assert train_rows[-1]["tokens_seen"] > train_rows[0]["tokens_seen"] > 0
    assert "tokens_per_s" not in train_rows[0]  # the first step's time is compile time
    assert all(r["tokens_per_s"] > 0 for r in train_rows[1:])
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert os.listdir(full / "tb")  # TensorBoard events (tensorboardX)
    run = json.load(open(full / "fmzoo_run.json"))
    assert run["model_config"]["d_model"] == 32 and run["settings"]["run"]["steps"] == 6
    # the record holds what ran: the recipe filled in the schedule the run left out
    assert Settings.from_dict({**run["settings"], "run": {**run["settings"]["run"],
                                                         "progress": False}}) == \
        lm_cfg(full).replace(optim=dict(schedule="cosine"))
    assert run["init"] == {"kind": "preset", "source": "gpt-tiny"}
    assert [h["start_step"] for h in run["history"]] == [0]
    assert sorted(Checkpointer(str(full)).manager.all_steps()) == [3, 6]
    assert not (full / "loss.png").exists()  # the plot is the CLI's, not the library's


def test_killed_and_resumed_run_matches_uninterrupted_bit_for_bit(runs):
    killed = runs / "killed"
    assert losses(killed)[-1][0] == 4  # the crash lost step 4's state, not its log line
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.1')  # and was killed while writing step 5's line
    summary = train(lm_cfg(killed, resume=True, optim__lr=3e-3, checkpoint__keep=4))
    assert summary["start_step"] == 3
    assert losses(killed) == losses(runs / "full")  # exact float equality, steps 1..6
    run = json.load(open(killed / "fmzoo_run.json"))  # the resumed run recorded its settings
    assert [h["start_step"] for h in run["history"]] == [0, 3]
    assert [h["settings"]["checkpoint"]["keep"] for h in run["history"]] == [5, 4]
    assert run["settings"]["checkpoint"]["keep"] == 4


def test_restore_onto_a_different_mesh(runs):
    work = runs / "other_mesh"
    shutil.copytree(runs / "killed_copy", work)
    train(lm_cfg(work, resume=True, mesh__spec="fsdp=4,tensor=2"))
    np.testing.assert_allclose([l for _, l in losses(work)], [l for _, l in losses(runs / "full")],
                               rtol=2e-5)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    loaded = load_workdir(str(work), mesh=mesh)
    emb = loaded.params["embed"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.sharding.mesh.shape == mesh.shape
    plain = fmzoo.load(str(work))  # the public entry point recognises the workdir
    np.testing.assert_array_equal(np.asarray(plain.params["embed"]["embedding"]), np.asarray(emb))
    assert plain.config == loaded.config and plain.tokenizer.decode([104, 105]) == "hi"


def test_divergence_stops_and_keeps_last_good_checkpoint(runs):
    work = runs / "nan"
    shutil.copytree(runs / "killed_copy", work)
    before = load_workdir(str(work)).params
    with pytest.raises(TrainingDiverged, match=r"non-finite values at step [45] \((param_norm|loss) (inf|nan)\); "
                       r"stopping without saving.*checkpoint \(step 3\).*intact.*Lower --lr"):
        train(lm_cfg(work, resume=True, optim__lr=1e30))
    assert Checkpointer(str(work)).latest_step() == 3
    after = load_workdir(str(work)).params
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.isfinite(np.asarray(b)).all()


def test_checkpoint_of_another_architecture_names_the_keys(runs):
    ckpt = Checkpointer(str(runs / "full"))
    other = get_config("gpt-tiny", **{**TINY, "n_layers": 2, "d_ff": 32})
    with pytest.raises(CheckpointError, match=r"another architecture.*missing from the checkpoint: "
                                              r"layers_1/.*different shapes: layers_0/mlp/"):
        ckpt.check_params(6, param_shapes(other))
    with pytest.raises(ConfigError, match=r"model differs.*n_layers=1 \(checkpoint\) vs 2"):
        prepare(lm_cfg(runs / "full", resume=True, model__overrides={**TINY, "n_layers": 2}))
    with pytest.raises(ConfigError, match=r"--resume --steps 2: the checkpoint is already at "
                                          r"step 6; pass --steps 7 or more"):
        prepare(lm_cfg(runs / "full", resume=True, steps=2))


def test_corrupt_and_missing_checkpoints(runs, tmp_path):
    work = tmp_path / "corrupt"
    shutil.copytree(runs / "full", work)
    params_dir = work / "checkpoints" / "6" / "params"
    for f in params_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"step 6 .* cannot be read.*corrupt or incomplete"):
        load_workdir(str(work))
    empty = tmp_path / "empty"
    with pytest.raises(CheckpointError, match=r"not a training workdir"):
        load_workdir(str(empty.mkdir() or empty))
    with pytest.raises(CheckpointError, match=r"not a training workdir.*fmzoo_run.json"):
        prepare(lm_cfg(tmp_path / "new", resume=True))
    with pytest.raises(CheckpointError, match=r"already holds checkpoints; pass --resume"):
        prepare(lm_cfg(runs / "full"))


def test_bad_input_is_refused_before_training(tmp_path):
    work = tmp_path / "w"
    with pytest.raises(ValueError, match=r"unknown dataset 'pyhton_docs'.*python_docs"):
        prepare(lm_cfg(work, data__name="pyhton_docs"))
    with pytest.raises(ConfigError, match=r"--seq-len 100 is longer than .* max_len=64"):
        prepare(lm_cfg(work, data__seq_len=100))
    with pytest.raises(MeshError, match=r"has 6 devices but 8 are available"):
        prepare(lm_cfg(work, mesh__spec="data=3,tensor=2"))
    with pytest.raises(ConfigError, match=r"needs a lm dataset.*seq2seq"):
        prepare(lm_cfg(work, data__name="algorithmic/reverse"))
    with pytest.raises(ConfigError, match=r"--sample-tokens 65 is more than the model's "
                                          r"max_len=64; pass --sample-tokens 64 or less"):
        prepare(lm_cfg(work, eval__sample_tokens=65))
    with pytest.raises(ConfigError, match=r"--tokenizer .*nope: no such directory"):
        prepare(lm_cfg(work, data__tokenizer=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"--workdir .*file is a file; pass a directory"):
        prepare(lm_cfg(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"--model .*: the directory is neither a training "
                                          r"workdir .* nor a Hugging Face directory"):
        prepare(lm_cfg(work, model__source=str(tmp_path)))
    assert not work.exists()  # nothing written


def test_continued_pretraining_from_a_workdir(runs, tmp_path):
    """--model WORKDIR: the new run starts from that run's weights with a fresh optimizer,
    records where it started, and keeps the workdir's tokenizer."""
    work = tmp_path / "continued"
    train(lm_cfg(work, model__source=str(runs / "full"), model__overrides={}, steps=1,
                 eval__every=0))
    run = json.load(open(work / "fmzoo_run.json"))
    eos = fmzoo.load(str(runs / "full")).config.eos_id  # a preset's run: its config's one id
    assert run["init"] == {"kind": "workdir", "source": str(runs / "full"), "step": 6,
                           "generation": {"do_sample": False, "eos_token_id": eos}}
    first = losses(work)[0][1]
    fresh, trained = losses(runs / "full")[0][1], losses(runs / "full")[-1][1]
    assert first < fresh - 0.3 and abs(first - trained) < 0.2, (first, fresh, trained)
    assert read_metrics(work)[0]["step"] == 1 and fmzoo.load(str(work)).tokenizer is not None
