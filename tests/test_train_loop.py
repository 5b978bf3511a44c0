"""The training loop end to end on 8 simulated devices: metrics, checkpoints, exact resume,
restore onto another mesh, NaN stop, loading a workdir, and the errors for bad input."""

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
from fmzoo.train.loop import TrainConfig, TrainingDiverged, prepare, train
from fmzoo.train.mesh import MeshError, make_mesh
from fmzoo.train.metrics import read_metrics

TINY = dict(n_layers=1, d_model=32, n_heads=4, d_ff=64, max_len=64)


def lm_cfg(workdir, **kw):
    base = dict(workdir=str(workdir), model="gpt-tiny", data="python_docs", steps=6,
                overrides=TINY, data_options={"max_files": 20}, batch_size=8, seq_len=32,
                lr=3e-3, warmup=2, log_every=1, eval_every=3, eval_batches=1, save_every=3,
                keep=5, sample_tokens=0, progress=False, mesh="data=8")
    return TrainConfig(**{**base, **kw})


def losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run killed after step 4 (last checkpoint: step 3)."""
    root = tmp_path_factory.mktemp("loop")
    full = root / "full"
    train(lm_cfg(full))
    killed = root / "killed"
    train(lm_cfg(killed, stop_after=4))
    shutil.copytree(killed, root / "killed_copy")  # for the other-mesh and NaN tests
    return root


def test_run_writes_metrics_checkpoints_and_run_file(runs):
    full = runs / "full"
    rows = read_metrics(full)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"accuracy", "perplexity", "grad_norm", "tokens_seen", "lr"} <= set(train_rows[0])
    assert train_rows[-1]["tokens_seen"] > train_rows[0]["tokens_seen"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert os.listdir(full / "tb")  # TensorBoard events (tensorboardX)
    run = json.load(open(full / "fmzoo_run.json"))
    assert run["model_config"]["d_model"] == 32 and run["settings"]["steps"] == 6
    assert sorted(Checkpointer(str(full)).manager.all_steps()) == [3, 6]
    png = (full / "loss.png").read_bytes()  # the loss curve, drawn at the end of the run
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_killed_and_resumed_run_matches_uninterrupted_bit_for_bit(runs):
    killed = runs / "killed"
    assert losses(killed)[-1][0] == 4  # the crash lost step 4's state, not its log line
    summary = train(lm_cfg(killed, resume=True))
    assert summary["start_step"] == 3
    assert losses(killed) == losses(runs / "full")  # exact float equality, steps 1..6


def test_restore_onto_a_different_mesh(runs):
    work = runs / "other_mesh"
    shutil.copytree(runs / "killed_copy", work)
    train(lm_cfg(work, resume=True, mesh="fsdp=4,tensor=2"))
    np.testing.assert_allclose([l for _, l in losses(work)], [l for _, l in losses(runs / "full")],
                               rtol=2e-5)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    loaded = load_workdir(str(work), mesh=mesh)
    emb = loaded.params["embed"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.sharding.mesh.shape == mesh.shape
    plain = fmzoo.load(str(work))  # the public entry point recognises the workdir
    np.testing.assert_array_equal(np.asarray(plain.params["embed"]["embedding"]), np.asarray(emb))
    assert plain.config == loaded.config and plain.tokenizer.decode([104, 105]) == "hi"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(runs):
    work = runs / "nan"
    shutil.copytree(runs / "killed_copy", work)
    before = load_workdir(str(work)).params
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step \d.*checkpoint \(step 3\).*intact"):
        train(lm_cfg(work, resume=True, lr=float("inf")))
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
        prepare(lm_cfg(runs / "full", resume=True, overrides={**TINY, "n_layers": 2}))


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
        prepare(lm_cfg(work, data="pyhton_docs"))
    with pytest.raises(ConfigError, match=r"--seq-len 100 is longer than .* max_len=64"):
        prepare(lm_cfg(work, seq_len=100))
    with pytest.raises(MeshError, match=r"has 6 devices but 8 are available"):
        prepare(lm_cfg(work, mesh="data=3,tensor=2"))
    with pytest.raises(ConfigError, match=r"needs a lm dataset.*seq2seq"):
        prepare(lm_cfg(work, data="algorithmic/reverse"))
    assert not work.exists()  # nothing written
