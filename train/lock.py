"""One run at a time per workdir: `workdir_lock` holds DIR/fmzoo.lock (pid, host, start
time) while a run writes there. Two runs on one workdir would interleave metrics.jsonl and
overwrite each other's checkpoints; a lock left behind by a killed run must not block forever.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import warnings

import jax

from fmzoo.models.workdir import CheckpointError, write_json_atomic

LOCK_FILE = "fmzoo.lock"


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a reused pid apart); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = holder.get("pid_start")
    return start is None or _proc_start(pid) in (None, start)


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        int(holder["pid"]), str(holder["host"])
        return holder
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir/fmzoo.lock` (pid, host, start time) while the block runs.

    A second live run on the workdir gets a CheckpointError; a lock left by a killed run on
    this host is taken over with a warning. In multi-process runs only process 0 locks.
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"--workdir {path} is a file, not a directory; choose a "
                              "directory (it is created if missing)")
    if jax.process_index() != 0:
        yield None
        return
    created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _proc_start(os.getpid()),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = f"{lock}.{me['pid']}.tmp"
    write_json_atomic(tmp, me)
    try:
        _acquire(lock, tmp, me)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            holder = _read_lock(lock)
            if holder and holder["pid"] == me["pid"] and holder["host"] == me["host"]:
                os.remove(lock)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if the run left nothing (e.g. it was refused)


def _acquire(lock: str, tmp: str, me: dict) -> None:
    for _ in range(3):
        if not os.path.exists(tmp):  # consumed by a takeover that another run won
            write_json_atomic(tmp, me)
        try:
            os.link(tmp, lock)  # atomic and complete: the lock never exists half-written
            return
        except FileExistsError:
            pass
        try:
            holder = _read_lock(lock)
        except FileNotFoundError:
            continue  # released meanwhile
        if holder is not None:
            if holder["host"] != me["host"]:
                raise CheckpointError(
                    f"{os.path.dirname(lock)} is in use by run pid {holder['pid']} on host "
                    f"{holder['host']} since {holder.get('since')}; wait for it or choose "
                    f"another --workdir (if that run is gone, delete {lock})")
            if _alive(holder):
                raise CheckpointError(
                    f"{os.path.dirname(lock)} is in use by run pid {holder['pid']} on host "
                    f"{holder['host']} since {holder.get('since')}; wait for it or choose "
                    "another --workdir")
        what = (f"left by run pid {holder['pid']} (since {holder.get('since')}), which is no "
                "longer running" if holder else "that is unreadable")
        warnings.warn(f"taking over the lock {lock} {what}", UserWarning, stacklevel=4)
        os.replace(tmp, lock)
        if (_read_lock(lock) or {}).get("pid") == me["pid"]:
            return
    raise CheckpointError(f"could not take the lock {lock}: other runs keep taking it; "
                          "choose another --workdir")
