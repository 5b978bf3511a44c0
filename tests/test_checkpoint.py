"""Checkpoints that cannot lie: the workdir lock, sha256 checksums (fall back on resume, a
clear error on load), an interrupted first save, the data-iterator position through grain's
orbax handler, and one clear error (no orbax/asyncio tracebacks) when a save fails."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.models.workdir import write_manifest
from fmzoo.train.batching import lm_pipeline
from fmzoo.train.checkpoint import (LOCK_FILE, Checkpointer, CheckpointError, abstract_like,
                                    has_checkpoints, load_workdir, workdir_lock, write_run_file)
from fmzoo.train.mesh import make_mesh
from fmzoo.train.optim import make_optimizer
from fmzoo.train.state import sharded_init, state_shapes

from train_helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.join(REPO, "tests")}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ---------------------------------------------------------------------------- lock


def test_second_live_run_is_refused_until_the_first_ends(tmp_path):
    work = tmp_path / "w"
    holder = _python(f"""
        import sys
        from fmzoo.train.checkpoint import workdir_lock
        with workdir_lock({str(work)!r}):
            print("held", flush=True)
            sys.stdin.readline()
        """, stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with pytest.raises(CheckpointError, match=(
                rf"w is in use by run pid {holder.pid} on host {socket.gethostname()} since "
                r"\d{4}-\d\d-\d\dT.*; wait for it or choose another --workdir")):
            with workdir_lock(str(work)):
                pass
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and not (work / LOCK_FILE).exists()
    with workdir_lock(str(work)) as lock:  # free again
        assert json.load(open(lock))["pid"] == os.getpid()


def test_stale_lock_is_taken_over_and_lock_released_on_error(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = tmp_path / "w"
    work.mkdir()
    (work / LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "since": "2020-01-01T00:00:00+00:00"}))
    with pytest.raises(RuntimeError, match="boom"):
        with pytest.warns(UserWarning, match=rf"taking over the lock .* left by run pid "
                                             rf"{dead.pid} .*no longer running"):
            with workdir_lock(str(work)) as lock:
                assert json.load(open(lock))["pid"] == os.getpid()
                raise RuntimeError("boom")
    assert sorted(os.listdir(work)) == []  # released on the exception, no temp files


def test_lock_on_another_host_and_bad_workdirs(tmp_path, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    (work / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(CheckpointError, match=r"in use by run pid 1 on host elsewhere since x; "
                                              r"wait .* delete .*fmzoo.lock"):
        with workdir_lock(str(work)):
            pass
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match=r"--workdir .*f is a file, not a directory"):
        with workdir_lock(str(tmp_path / "f")):
            pass
    with workdir_lock(str(tmp_path / "new")):  # created for the run ...
        assert (tmp_path / "new" / LOCK_FILE).exists()
    assert not (tmp_path / "new").exists()  # ... and removed when the run left nothing in it
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # multi-process: process 0 locks
    with workdir_lock(str(work)):  # (the other host's lock is not process 1's business)
        pass


# ---------------------------------------------------------------------------- checksums


CONFIG = tiny_config("gpt")
TX = make_optimizer(1e-3, 10)


def _saved(work, steps=(1, 2, 3)):
    """A workdir with run file, tokenizer and a checkpoint per step (params differ per step)."""
    state, shardings = sharded_init(CONFIG, TX, make_mesh("data=1", jax.devices()[:1]), 0)
    work.mkdir(parents=True)
    write_run_file(str(work), CONFIG, {"steps": 3})
    ByteTokenizer().save(str(work / "tokenizer"))
    ckpt = Checkpointer(str(work), keep=5, async_save=False)
    for s in steps:
        state = state.replace(step=np.asarray(s, state.step.dtype), params=jax.tree.map(lambda p: p + 1.0, state.params))
        ckpt.save(state, {"step": s})
    ckpt.close()
    return state, shardings


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    work = tmp_path_factory.mktemp("ck") / "w"
    state, shardings = _saved(work)
    return work, state, shardings


def _largest_params_file(step_dir):
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path, n=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_found_on_load_and_resume_falls_back(saved, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(saved[0], work)
    intact = load_workdir(str(work), step=2).params
    bad = _largest_params_file(work / "checkpoints" / "3")
    _flip(bad)
    rel = os.path.relpath(bad, work / "checkpoints" / "3")
    with pytest.raises(CheckpointError, match=(
            rf"checkpoint at step 3 in .* cannot be read: file {rel} does not match its sha256 "
            r"checksum; it is corrupt or incomplete\. Load step=2 \(intact\) instead")):
        load_workdir(str(work))
    ckpt = Checkpointer(str(work), keep=5)
    with pytest.warns(UserWarning, match=r"step 3 .* damaged .*falling back"):
        assert ckpt.latest_step() == 2
    target = abstract_like(state_shapes(CONFIG, TX, 0), saved[2])
    with pytest.raises(CheckpointError, match=rf"step 3 .*{rel} does not match"):
        ckpt.restore(3, target)
    with pytest.warns(UserWarning, match=r"moved the damaged checkpoint step 3"):
        state, meta = ckpt.restore(2, target)
    assert meta == {"step": 2} and int(state.step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(intact)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.save(state.replace(step=np.asarray(3, state.step.dtype)), {"step": 3})  # the resumed run saves step 3 again
    ckpt.close()
    assert os.listdir(work / "checkpoints_damaged")[0].startswith("3-")
    assert load_workdir(str(work)).params is not None  # the new step 3 is intact


def test_damaged_step_without_intact_fallback_and_missing_manifest(saved, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(saved[0], work)
    for s in (1, 2):
        os.remove(work / "checkpoints" / str(s) / "fmzoo_sha256.json")
    with pytest.raises(CheckpointError, match=r"step 2 .*no checksum file fmzoo_sha256.json.*"
                                              r"No earlier intact step exists"):
        load_workdir(str(work), step=2)
    (work / "checkpoints" / "3" / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step 3 .*file meta/metadata is missing"):
        load_workdir(str(work))


# ---------------------------------------------------------------------------- interrupted save


def test_interrupted_first_save_leaves_a_restartable_workdir(tmp_path):
    work = tmp_path / "w"
    tmp_step = work / "checkpoints" / "5.orbax-checkpoint-tmp"  # what orbax names it
    (tmp_step / "params").mkdir(parents=True)
    (tmp_step / "params" / "partial").write_bytes(b"\0" * 100)
    assert not has_checkpoints(str(work))  # so a fresh start is allowed ...
    with pytest.warns(UserWarning, match=r"removing unfinished checkpoint directory "
                                         r"5.orbax-checkpoint-tmp .*interrupted"):
        ckpt = Checkpointer(str(work))
    assert ckpt.latest_step() is None and not tmp_step.exists()  # ... and resume says "none"
    state, _ = sharded_init(CONFIG, TX, make_mesh("data=1", jax.devices()[:1]), 0)
    ckpt.save(state.replace(step=np.asarray(5, state.step.dtype)), {})
    ckpt.close()
    assert has_checkpoints(str(work)) and Checkpointer(str(work)).latest_step() == 5


# ---------------------------------------------------------------------------- data position


def _docs_iter():
    docs = [f"document number {i} " * (1 + i % 5) for i in range(40)]
    tok = ByteTokenizer()
    return lm_pipeline(docs, lambda d: [tok.bos_id] + tok.encode(d) + [tok.eos_id],
                       batch_size=4, seq_len=16, pad_id=tok.pad_id, seed=3, num_threads=1)


def test_data_position_is_saved_per_process_and_restored(saved, tmp_path):
    work = tmp_path / "w"
    state, shardings = saved[1], saved[2]
    it = _docs_iter()
    for _ in range(3):
        next(it)
    ckpt = Checkpointer(str(work))
    ckpt.save(state, {}, data_iter=it)
    expected = [next(it) for _ in range(2)]  # the save must not depend on these
    ckpt.close()
    assert "process_0-of-1.json" in os.listdir(work / "checkpoints" / "3" / "data")
    fresh = _docs_iter()
    target = abstract_like(state_shapes(CONFIG, TX, 0), shardings)
    Checkpointer(str(work)).restore(3, target, data_iter=fresh)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    data_dir = work / "checkpoints" / "3" / "data"
    os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
    write_manifest(str(data_dir.parent))  # as if two processes had written it
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) but this run has 1; "
                                              r"resume with 2 processes"):
        Checkpointer(str(work)).restore(3, target, data_iter=_docs_iter())


# ---------------------------------------------------------------------------- failing save


def test_failing_save_gives_one_clear_error_and_no_traceback(tmp_path):
    """A save that fails in orbax's background thread (here: no space left while writing
    the checksums) surfaces once, as a CheckpointError, with nothing noisy on stderr."""
    proc = _python(f"""
        import jax
        import fmzoo.train.checkpoint as ck
        from fmzoo.train.mesh import make_mesh
        from fmzoo.train.optim import make_optimizer
        from fmzoo.train.state import sharded_init
        from train_helpers import tiny_config
        state, _ = sharded_init(tiny_config("gpt"), make_optimizer(1e-3, 10),
                                make_mesh("data=1", jax.devices()[:1]), 0)
        def full(step_dir):
            raise OSError(28, "No space left on device")
        ck.write_manifest = full
        ckpt = ck.Checkpointer({str(tmp_path / "w")!r})
        try:
            ckpt.save(state, {{}})
            ckpt.close()
        except ck.CheckpointError as e:
            print("ERROR", e)
        ckpt.close()
        """)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert out.count("ERROR") == 1 and "saving the checkpoint at step 0 in" in out
    assert "No space left on device" in out and "writable and the disk has space" in out
    noise = [line for line in err.splitlines() if "Traceback" in line or "Event loop" in line
             or line.startswith("ERROR")]
    assert noise == [], err[-3000:]
