"""Per-device memory of a compiled training step on 8 simulated CPU devices, by mesh.

    python bench/memory.py                       # gpt2-124m and llama-3.2-1b, three meshes
    python bench/memory.py --presets gpt-tiny --meshes data=8 fsdp=8 --json

Compile only: the TrainState and the batch enter `step.lower` as ShapeDtypeStructs carrying
the NamedShardings of `train.state.state_shardings` (the same layout `sharded_init` creates),
so no weights are materialised and a 1B-parameter model costs only its compile time.
For each (preset, mesh) it prints XLA's `compiled.memory_analysis()` per device:
  argument (state + this device's batch rows), output (new state + metrics), temp
  (activations, gradients, gathered weights), generated code, and their sum. The state is
  donated, so the output aliases the argument (`alias`): what is live at the peak is about
  argument + output - alias + temp.
"state/device" is the state's share of the argument (argument - batch bytes per device);
"state (layout)" the same number computed from the shardings alone (shard shapes x dtype),
which checks that XLA keeps exactly the layout we asked for. The replicated / sharded ratio
of the state is the point: FSDP should divide the state by about the device count.
Prints a markdown table; with --json also one JSON object per measurement on stdout.
Writes nothing to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

N_DEVICES = 8
MESHES = ("data=8", "fsdp=8", "fsdp=4,tensor=2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["gpt2-124m", "llama-3.2-1b"])
    p.add_argument("--meshes", nargs="+", default=list(MESHES),
                   help="mesh specs over the 8 simulated devices")
    p.add_argument("--batch", type=int, default=8, help="global batch rows (divisible by 8)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="also one JSON object per measurement")
    args = p.parse_args(argv)
    if args.batch % N_DEVICES:
        p.error(f"--batch {args.batch} does not split over {N_DEVICES} devices; "
                f"use a multiple of {N_DEVICES}")
    return args


def _force_devices() -> None:
    """8 host devices; must run before jax is imported (XLA reads the flag once)."""
    if "jax" in sys.modules:
        import jax
        if jax.device_count() < N_DEVICES:
            raise SystemExit(f"jax is already imported with {jax.device_count()} devices; "
                             f"run with XLA_FLAGS=--xla_force_host_platform_device_count="
                             f"{N_DEVICES}")
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = f"--xla_force_host_platform_device_count={N_DEVICES}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def shard_bytes(shapes, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs laid out by `shardings`."""
    import jax
    return sum(math.prod(sh.shard_shape(s.shape)) * s.dtype.itemsize
               for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def abstract_step(config, mesh, batch: int, seq_len: int, packed: bool = False):
    """(jitted step, abstract state, abstract batch), nothing allocated: `step.lower(state,
    batch)` compiles the real AdamW training step from shapes and shardings alone. packed
    adds positions and segment ids, as a packed batch has."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from fmzoo.models.registry import build
    from fmzoo.train import make_loss, make_optimizer, make_train_step
    from fmzoo.train.mesh import BATCH_AXES
    from fmzoo.train.state import state_shapes, state_shardings
    tx = make_optimizer(1e-4, 1000)
    shapes = state_shapes(config, tx)
    shardings = state_shardings(config, shapes, mesh, tx)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, shardings)
    rows = NamedSharding(mesh, P(BATCH_AXES, None))
    kinds = [("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32)]
    if packed:
        kinds += [("positions", jnp.int32), ("segment_ids", jnp.int32)]
    data = {k: jax.ShapeDtypeStruct((batch, seq_len), dt, sharding=rows) for k, dt in kinds}
    step = make_train_step(make_loss(build(config), config), tx, mesh, shardings)
    return step, state, data


def measure(preset: str, mesh_spec: str, batch: int, seq_len: int) -> dict:
    import jax

    from fmzoo.models import count_params, get_config
    from fmzoo.train.mesh import make_mesh
    config = get_config(preset)
    mesh = make_mesh(mesh_spec)
    t0 = time.perf_counter()
    step, state, data = abstract_step(config, mesh, batch, seq_len)
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    batch_dev = shard_bytes(data, jax.tree.map(lambda s: s.sharding, data))
    state_layout = shard_bytes(state, jax.tree.map(lambda s: s.sharding, state))
    state_total = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(state))
    row = dict(bench="memory", preset=preset, params=count_params(config), mesh=mesh_spec,
               batch=batch, seq_len=seq_len,
               argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes,
               alias=m.alias_size_in_bytes)
    row["sum"] = row["argument"] + row["output"] + row["temp"] + row["code"]
    row["live"] = row["sum"] - row["alias"]  # donated state: output reuses the argument
    row.update(batch_per_device=batch_dev, state_per_device=row["argument"] - batch_dev,
               state_layout=state_layout, state_total=state_total, compile_s=compile_s)
    return row


def gb(n: float) -> str:
    return f"{n / 2**30:.3f}"


def format_table(rows: list[dict]) -> str:
    cols = ["preset", "mesh", "argument", "output", "temp", "code", "sum", "alias",
            "sum - alias", "state/device", "state (layout)", "state total / state/device"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["preset"], r["mesh"], *(gb(r[k]) for k in ("argument", "output", "temp")),
            f"{r['code'] / 2**20:.1f} MiB", gb(r["sum"]), gb(r["alias"]), gb(r["live"]),
            gb(r["state_per_device"]), gb(r["state_layout"]),
            f"{r['state_total'] / r['state_per_device']:.2f}"]) + " |")
    lines += ["", "| preset | mesh | replicated state / this mesh's state (per device) "
              f"| divided by ~{N_DEVICES}? |", "|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["preset"] == r["preset"]
                     and b["mesh"].replace(" ", "") == "data=8"), None)
        if base is not None and r is not base:
            ratio = base["state_per_device"] / r["state_per_device"]
            # within 10%: only norms, biases and counters may stay whole
            verdict = "yes" if ratio >= 0.9 * N_DEVICES else "no"
            lines.append(f"| {r['preset']} | {r['mesh']} | {ratio:.2f}x | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    _force_devices()
    import jax
    if jax.device_count() != N_DEVICES:
        raise SystemExit(f"expected {N_DEVICES} devices, jax sees {jax.device_count()}")
    from fmzoo.models import get_config
    from fmzoo.train.mesh import MeshError, parse_mesh_spec
    try:  # bad specs and presets fail before any compile
        for spec in args.meshes:
            parse_mesh_spec(spec, N_DEVICES)
    except MeshError as e:
        raise SystemExit(f"error: --meshes: {e}") from None
    from fmzoo.models.config import ConfigError
    for preset in args.presets:
        try:
            max_len = get_config(preset).max_len
        except ConfigError as e:
            raise SystemExit(f"error: --presets: {e}") from None
        if args.seq_len > max_len:
            raise SystemExit(f"error: --seq-len {args.seq_len} exceeds {preset}'s max_len "
                             f"{max_len}; pass a shorter --seq-len")
    rows = []
    for preset in args.presets:
        for spec in args.meshes:
            print(f"  [{preset}] {spec}: compiling", file=sys.stderr, flush=True)
            row = measure(preset, spec, args.batch, args.seq_len)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n## memory (bench/memory.py) -- {stamp}\n\n"
          f"Per-device bytes (GiB) of one AdamW training step, fp32, batch {args.batch} x "
          f"{args.seq_len}, {N_DEVICES} simulated CPU devices on {platform.node() or '?'}; "
          f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f} at the end. Compile "
          f"only (abstract inputs). 'code' is 0 on CPU: XLA:CPU does not report it.\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
