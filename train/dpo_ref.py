"""`--precompute-ref`: the reference model's log-probs computed once, in a pass over a split
before training, stored with the prepared data and fed to the step as batch["ref_logps"].

The table lives under DATA_DIR/fmzoo_ref_logps/ as NAME-KEY.npz (+ .json, written last:
a table without its .json is ignored), KEY a digest of the reference weights and config,
the dataset and split, the batch options and max_length. Each record also keeps a
checksum of its real tokens and response mask, checked at every lookup, so data prepared
differently since (another tokenizer, an edited file) is refused rather than misread.
Padding is not in the checksum: the log-probs do not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from typing import Any, Callable, Iterable

import numpy as np

FORMAT = "fmzoo-ref-logps/1"
DIR = "fmzoo_ref_logps"


def params_digest(params: Any) -> str:
    """sha256 over the weights (paths, dtypes, shapes, bytes): the reference's identity."""
    import jax
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}|".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def row_checksums(batch: dict) -> np.ndarray:
    """uint32[B]: crc32 of each pair's real tokens and response mask (padding excluded)."""
    tokens, mask, resp = (np.asarray(batch[k]) for k in ("tokens", "mask", "response_mask"))
    out = np.zeros(tokens.shape[0], np.uint32)
    for b in range(tokens.shape[0]):
        crc = 0
        for j in range(2):
            real = mask[b, j] > 0
            crc = zlib.crc32(tokens[b, j][real].astype(np.int32).tobytes(), crc)
            crc = zlib.crc32((resp[b, j][real] > 0).astype(np.uint8).tobytes() + b"|", crc)
        out[b] = crc
    return out


def _real_rows(batch: dict) -> np.ndarray:
    return (np.asarray(batch["mask"]).reshape(len(batch["index"]), -1) > 0).any(-1)


class RefTable:
    """Reference log-probs [N, 2] and checksums [N] by record index."""

    def __init__(self, logps: np.ndarray, checksums: np.ndarray, known: np.ndarray,
                 path: str | None = None):
        self.logps, self.checksums, self.known, self.path = logps, checksums, known, path

    def lookup(self, batch: dict) -> np.ndarray:
        """float32[B, 2] for a batch's rows (0 for padding rows); a row the table does not
        hold, or holds for other tokens, raises with the fix."""
        index = np.asarray(batch["index"]).astype(np.int64)
        real = _real_rows(batch)
        out = np.zeros((len(index), 2), np.float32)
        if not real.any():
            return out
        idx = index[real]
        where = f" ({self.path})" if self.path else ""
        fix = "delete that file to compute it again" if self.path else "compute it again"
        inside = (idx >= 0) & (idx < len(self.known))
        missing = ~inside
        missing[inside] = ~self.known[idx[inside]]
        if missing.any():
            raise ValueError(f"the precomputed reference log-probs{where} have no entry for "
                             f"record(s) {sorted(set(idx[missing].tolist()))[:5]}; {fix}")
        bad = row_checksums(batch)[real] != self.checksums[idx]
        if bad.any():
            raise ValueError(f"the precomputed reference log-probs{where} were computed for "
                             f"other tokens at record(s) {idx[bad][:5].tolist()} (the data or "
                             f"tokenizer changed); {fix}")
        out[real] = self.logps[idx]
        return out


class WithRefLogps:
    """A batch iterator with batch["ref_logps"] added from a RefTable; get_state /
    set_state (and everything else) are the wrapped iterator's, so resume is unchanged."""

    def __init__(self, batches: Any, table: RefTable):
        self._batches, self.table = batches, table

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self._batches))
        batch["ref_logps"] = self.table.lookup(batch)
        return batch

    def __getattr__(self, name):  # get_state, set_state, num_truncated, spec, ...
        return getattr(self._batches, name)


def cache_path(data_dir: str, name: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(name.rstrip("/")))[:40] or "data"
    return os.path.join(data_dir, DIR, f"{slug}-{key['split']}-{digest}.npz")


def load_table(path: str, key: dict) -> RefTable | None:
    meta_path = path[:-4] + ".json"
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("key") != key:
        return None
    with np.load(path, allow_pickle=False) as z:
        return RefTable(z["logps"], z["checksums"], z["known"], path)


def _save_table(path: str, key: dict, table: RefTable) -> None:
    """The .npz, then the .json that makes it valid; each written whole then renamed."""
    from fmzoo.models.workdir import write_json_atomic
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, logps=table.logps, checksums=table.checksums, known=table.known)
    os.replace(tmp, path)
    write_json_atomic(path[:-4] + ".json", {"format": FORMAT, "key": key,
                                            "records": int(table.known.sum())})


def compute_table(logps_fn: Callable[[dict], np.ndarray], batches: Iterable[dict]) -> RefTable:
    """One pass: `logps_fn(batch) -> float32[B, 2]` over every batch of a split."""
    found: dict[int, tuple[np.ndarray, int]] = {}
    for batch in batches:
        real = _real_rows(batch)
        if not real.any():
            continue
        values = np.asarray(logps_fn(batch), np.float32)
        sums = row_checksums(batch)
        for row, (i, ok) in enumerate(zip(np.asarray(batch["index"]).tolist(), real.tolist())):
            if ok and i not in found:
                found[i] = (values[row], int(sums[row]))
    n = max(found) + 1 if found else 0
    logps = np.zeros((n, 2), np.float32)
    checksums = np.zeros(n, np.uint32)
    known = np.zeros(n, bool)
    for i, (v, c) in found.items():
        logps[i], checksums[i], known[i] = v, c, True
    return RefTable(logps, checksums, known)


def reference_table(model: Any, config: Any, params: Any, batches: Callable[[], Iterable],
                    *, data_dir: str, name: str, key: dict, batch_size: int) -> RefTable:
    """The stored table for `key` (with the reference's digest added), else one computed
    by a pass over `batches()` (whole batches of `batch_size` rows) on this process's
    devices and stored (by process 0)."""
    import math

    import jax

    from fmzoo.models import registry
    from fmzoo.models.sharding import sharding_context

    from .dpo_losses import reference_logps
    from .mesh import batch_sharding, make_mesh
    key = {**key, "reference": params_digest(params), "config": config.to_dict()}
    path = cache_path(data_dir, name, key)
    table = load_table(path, key)
    if table is not None:
        return table
    devices = jax.local_devices()
    mesh = make_mesh(None, devices[:math.gcd(batch_size, len(devices))])
    placed = registry.place_params(params, config, mesh)
    fn = jax.jit(lambda p, b: reference_logps(model, p, b))

    def logps(batch):
        inputs = {k: jax.device_put(np.asarray(batch[k]), batch_sharding(mesh, 3))
                  for k in ("tokens", "mask", "response_mask")}
        with sharding_context(mesh):
            return jax.device_get(fn(placed, inputs))
    table = compute_table(logps, batches())
    if jax.process_index() == 0:
        _save_table(path, key, table)
    table.path = path
    return table
