"""Two processes on localhost (jax.distributed, gloo, 4 CPU devices each) train 3 steps on a
global mesh, each feeding its own half of the batch, and agree with the one-process run on
8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fmzoo.train.checkpoint import committed_steps, load_workdir
from fmzoo.train.mesh import MeshError, maybe_initialize_distributed
from fmzoo.train.metrics import read_metrics
from train_helpers import batches, local_numpy, tiny_config, train_on_mesh

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(mode: str, *args: str) -> None:
    """Runs the worker as processes 0 and 1 on localhost; both must succeed."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    procs = [subprocess.Popen([sys.executable, WORKER, mode, port, str(i), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-3000:]


def test_two_processes_agree_with_one(tmp_path):
    out = tmp_path / "result.json"
    launch("steps", str(out))
    result = json.loads(out.read_text())

    losses, state = train_on_mesh(tiny_config("gpt"), batches("gpt", 3), "data=2,fsdp=2,tensor=2")
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    ours = {jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(local_numpy(state.params))[0]}
    assert set(result["params"]) == set(ours)
    for key, value in ours.items():
        np.testing.assert_allclose(np.asarray(result["params"][key]), value, atol=5e-5,
                                   rtol=1e-4, err_msg=key)


def test_two_process_training_run_saves_and_resumes(tmp_path):
    """`fmzoo train` as two processes: each reads its own shard of the data; the checkpoint
    keeps both data positions, and a resumed two-process run continues from them."""
    work = tmp_path / "run"
    common = ["--model", "gpt-tiny", "--data", "python_docs", "--workdir", str(work),
              "--batch-size", "8", "--seq-len", "32", "--mesh", "data=2,fsdp=2,tensor=2",
              "--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0", "--log-every",
              "1", "--data-opt", "max_files=20", "--no-progress", "n_layers=1", "d_model=32",
              "d_ff=64"]
    launch("cli", "--", *common, "--steps", "2", "--save-every", "2")
    launch("cli", "--", *common, "--steps", "4", "--save-every", "2", "--resume")
    assert [r["step"] for r in read_metrics(work) if "loss" in r] == [1, 2, 3, 4]
    assert committed_steps(str(work / "checkpoints")) == [2, 4]
    data_dir = work / "checkpoints" / "4" / "data"  # one position per process (grain's handler)
    states = [(data_dir / f"process_{i}-of-2.json").read_text() for i in range(2)]
    assert states[0] != states[1]
    run = json.loads((work / "fmzoo_run.json").read_text())
    assert [h["start_step"] for h in run["history"]] == [0, 2]
    assert np.isfinite(np.asarray(load_workdir(str(work)).params["embed"]["embedding"])).all()


def test_distributed_settings_must_be_complete(monkeypatch):
    for name in ("FMZOO_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "FMZOO_NUM_PROCESSES",
                 "JAX_NUM_PROCESSES", "FMZOO_PROCESS_ID", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert maybe_initialize_distributed() is False  # single process: nothing to do
    with pytest.raises(MeshError, match=r"not process_id; pass --num-processes and --process-id"):
        maybe_initialize_distributed("localhost:1234", num_processes=2)
    with pytest.raises(MeshError, match=r"without a coordinator address"):
        maybe_initialize_distributed(num_processes=2, process_id=0)


def test_two_process_sft_with_lora_counts_every_process(tmp_path):
    """`fmzoo sft` with LoRA as two processes: each feeds its half of every batch, the loss
    and the token counts are global (num_tokens is the same as one process reading the same
    number of rows would count), the eval is over global batches, and the adapters saved
    by process 0 load merged."""
    work = tmp_path / "sft"
    launch("sft", "--", "--model", "llama-tiny", "n_layers=1", "d_model=32", "n_heads=2",
           "n_kv_heads=1", "d_ff=64", "max_len=64", "--data", "tasks/reverse", "--workdir",
           str(work), "--data-dir", str(tmp_path / "tfds"), "--batch-size", "8",
           "--max-length", "32", "--mesh", "data=2,fsdp=2,tensor=2", "--steps", "2",
           "--save-every", "2", "--eval-batches", "1", "--eval-examples", "0",
           "--no-eval-at-start", "--log-every", "1", "--lora-rank", "2", "--no-progress")
    rows = read_metrics(work)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    # every example of tasks/reverse is one short chat: 8 rows give more than 8 tokens each
    assert 8 * 8 < train[0]["num_tokens"] < train[1]["num_tokens"] <= 2 * 8 * 32
    assert any("eval_loss" in r for r in rows)
    data_dir = work / "checkpoints" / "2" / "data"
    assert {f"process_{i}-of-2.json" for i in range(2)} <= set(os.listdir(data_dir))
    params = load_workdir(str(work)).params  # merged: a plain model tree
    assert "lora" not in params and np.isfinite(np.asarray(params["embed"]["embedding"])).all()
