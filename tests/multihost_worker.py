"""One process of the two-process training tests (tests/test_train_multihost.py).

    python tests/multihost_worker.py steps PORT PROCESS_ID OUT.json
    python tests/multihost_worker.py cli PORT PROCESS_ID -- FMZOO_TRAIN_ARGS...
    python tests/multihost_worker.py sft PORT PROCESS_ID -- FMZOO_SFT_ARGS...

Each process has 4 simulated CPU devices; jax.distributed joins them into one 8-device
system with gloo collectives. `steps`: the process feeds only its half of every global
batch, trains 3 steps on the global mesh data=2,fsdp=2,tensor=2, and (process 0) writes the
losses and the gathered params as JSON. `cli` / `sft`: runs `fmzoo train` / `fmzoo sft` as
this process.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def run_cli(command: str, port: str, process_id: str, args: list[str]) -> int:
    from fmzoo.cli import main
    return main([command, *args, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                 "--process-id", process_id])


def run_steps(port: str, process_id: str, out: str) -> None:
    from fmzoo.train.mesh import maybe_initialize_distributed
    assert maybe_initialize_distributed(f"localhost:{port}", 2, int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    from jax.experimental import multihost_utils
    from train_helpers import batches, tiny_config, train_on_mesh

    global_batches = batches("gpt", 3)
    rows = 16 // jax.process_count()
    lo = jax.process_index() * rows
    local = [{k: v[lo:lo + rows] for k, v in b.items()} for b in global_batches]
    losses, state = train_on_mesh(tiny_config("gpt"), local, "data=2,fsdp=2,tensor=2")
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): v.tolist()
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        with open(out, "w") as f:
            json.dump({"losses": losses, "params": flat}, f)
    multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
    if sys.argv[1] in ("cli", "sft"):
        sys.exit(run_cli("train" if sys.argv[1] == "cli" else "sft", sys.argv[2], sys.argv[3],
                         sys.argv[5:]))
    run_steps(*sys.argv[2:5])
