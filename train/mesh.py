"""Device meshes, multi-host start-up, and getting a host batch onto the mesh.

The mesh always has the three axes of the zoo's sharding rules: 'data' (batch only),
'fsdp' (batch and parameter shards) and 'tensor' (model parallel). A spec string names
the sizes, e.g. "data=2,fsdp=2,tensor=2"; axes left out have size 1 and one axis may be -1
("whatever is left").
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmzoo.models.sharding import MESH_AXES

BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


class MeshError(ValueError):
    """A mesh spec that cannot be laid out on the devices at hand."""


def parse_mesh_spec(spec: str | dict[str, int] | None, n_devices: int) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}, checked against
    n_devices."""
    example = f"--mesh data={n_devices},fsdp=1,tensor=1"
    if spec is None or spec == "":
        sizes = {"data": -1}
    elif isinstance(spec, dict):
        sizes = dict(spec)
    else:
        sizes = {}
        for part in spec.split(","):
            name, eq, value = part.strip().partition("=")
            name = name.strip()
            if not eq:
                raise MeshError(f"mesh spec entry {part!r} is not name=size; write e.g. {example}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh axis {name!r} has size {value!r}, which is not an integer; "
                                f"write e.g. {example}") from None
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)} "
                        f"(e.g. {example})")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise MeshError("only one mesh axis may be -1")
    bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad:
        raise MeshError(f"mesh axis sizes must be positive (or one -1), got {', '.join(bad)}")
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    for name, v in sizes.items():
        if v == -1:
            if n_devices % known:
                raise MeshError(f"cannot fill axis {name!r}: {known} does not divide the "
                                f"{n_devices} devices; e.g. {example}")
            sizes[name] = n_devices // known
    full = {a: sizes.get(a, 1) for a in MESH_AXES}
    product = int(np.prod(list(full.values())))
    if product != n_devices:
        shown = ",".join(f"{k}={v}" for k, v in full.items())
        raise MeshError(f"mesh {shown} has {product} devices but {n_devices} are available; "
                        f"the sizes must multiply to {n_devices}, e.g. {example}")
    return full


def make_mesh(spec: str | dict[str, int] | None = None, devices: list | None = None) -> Mesh:
    """A Mesh over ('data', 'fsdp', 'tensor') on `devices` (default: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's part of the batch into global arrays sharded over the batch axes.

    Every process passes its own rows (its local batch); the global batch is their
    concatenation in process order.
    """
    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return {k: one(v) for k, v in batch.items()}


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = batch_divisor(mesh)
    if global_batch % n:
        raise MeshError(f"the global batch size {global_batch} is not divisible by "
                        f"data*fsdp = {n} of the mesh {dict(mesh.shape)}; choose a batch size "
                        f"that is a multiple of {n}")


_ENV = {  # our names first, then the ones jax itself and common launchers use
    "coordinator_address": ("FMZOO_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("FMZOO_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("FMZOO_PROCESS_ID", "JAX_PROCESS_ID"),
}


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when a coordinator is given (argument or env var).

    Returns True when this is a multi-process run. Must run before anything touches devices.
    """
    args = {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id}
    for key, names in _ENV.items():
        if args[key] is None:
            for name in names:
                if os.environ.get(name):
                    args[key] = os.environ[name]
                    break
    if args["coordinator_address"] is None:
        if args["num_processes"] is not None or args["process_id"] is not None:
            raise MeshError("num_processes/process_id were given without a coordinator address; "
                            "pass --coordinator HOST:PORT (or set JAX_COORDINATOR_ADDRESS)")
        return False
    missing = [k for k in ("num_processes", "process_id") if args[k] is None]
    if missing:
        raise MeshError(f"a coordinator address was given but not {' and '.join(missing)}; "
                        "pass --num-processes and --process-id (or FMZOO_NUM_PROCESSES / "
                        "FMZOO_PROCESS_ID)")
    jax.distributed.initialize(args["coordinator_address"], int(args["num_processes"]),
                               int(args["process_id"]))
    return True
