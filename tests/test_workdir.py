"""The workdir reader (fmzoo.models.workdir): params + config + tokenizer without the training
package, dtype and shape-preserving overrides honoured, shape-changing ones refused."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models.config import ConfigError
from fmzoo.models.tokenizer import ByteTokenizer
from fmzoo.models.workdir import load_workdir
from fmzoo.train.checkpoint import Checkpointer, write_run_file
from fmzoo.train.mesh import make_mesh
from fmzoo.train.optim import make_optimizer
from fmzoo.train.state import sharded_init

from train_helpers import tiny_config

CONFIG = tiny_config("llama")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("wd") / "w"
    work.mkdir()
    state, _ = sharded_init(CONFIG, make_optimizer(1e-3, 10), make_mesh("data=8"), 0)
    write_run_file(str(work), CONFIG, {})
    ByteTokenizer().save(str(work / "tokenizer"))
    ckpt = Checkpointer(str(work), async_save=False)
    ckpt.save(state.replace(step=np.asarray(2, state.step.dtype)), {})
    ckpt.close()
    return work, state.params


def test_load_gives_the_saved_params_config_and_tokenizer(workdir):
    work, params = workdir
    loaded = load_workdir(str(work))
    assert loaded.config == CONFIG and loaded.tokenizer.decode([104, 105]) == "hi"
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = make_mesh("fsdp=4,tensor=2")
    emb = load_workdir(str(work), mesh=mesh).params["embed"]["embedding"]
    assert emb.sharding.mesh.shape == mesh.shape and not emb.sharding.is_fully_replicated


def test_dtype_and_overrides_are_honoured_or_refused(workdir):
    work, params = workdir
    loaded = load_workdir(str(work), dtype="bfloat16", attention_impl="reference", remat="full")
    assert (loaded.config.dtype, loaded.config.param_dtype) == ("bfloat16", "bfloat16")
    assert loaded.config.attention_impl == "reference" and loaded.config.remat == "full"
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(loaded.params["embed"]["embedding"]),
                                  np.asarray(params["embed"]["embedding"].astype(jnp.bfloat16)))
    x = jnp.array([[1, 2, 3]], jnp.int32)

    def logits(ld):
        out = ld.model.apply({"params": ld.params}, x)
        return np.asarray(out[0] if isinstance(out, tuple) else out, np.float32)
    fp32, bf16 = logits(load_workdir(str(work))), logits(loaded)
    assert not np.array_equal(fp32, bf16)  # it really computes in bfloat16 ...
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * np.abs(fp32).max())  # ... the same model
    with pytest.raises(ConfigError, match=r"override\(s\) d_ff would change the shapes"):
        load_workdir(str(work), d_ff=128, dropout=0.1)
    with pytest.raises(ConfigError, match=r"n_hedas"):
        load_workdir(str(work), n_hedas=2)


def test_loading_a_workdir_does_not_import_the_training_package(workdir):
    code = textwrap.dedent(f"""
        import sys
        import fmzoo.models.workdir as w
        loaded = w.load_workdir({str(workdir[0])!r}, dtype="bfloat16")
        assert loaded.params["embed"]["embedding"].dtype.name == "bfloat16"
        print(sorted(m for m in sys.modules if m.startswith("fmzoo.train")))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
