"""Reading a training workdir (what `fmzoo train` writes) without the training package.

    DIR/fmzoo_run.json        marks a training workdir: model config, run settings
    DIR/fmzoo.lock            held while a run writes to DIR (fmzoo.train.checkpoint)
    DIR/tokenizer/            the tokenizer (tokenizer.save)
    DIR/checkpoints/<step>/   one orbax CheckpointManager step, with the items
        params                the model params (restorable alone: `load_workdir`)
        train                 step, optimiser state, rng
        data                  the data-iterator position of each process (grain's handler)
        meta                  JSON: model config, tokens seen
        fmzoo_sha256.json     sha256 of every file above, written inside orbax's temporary
                              directory before it is renamed: a committed step always has it
    DIR/metrics.jsonl, DIR/tb/  metrics

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
run killed mid-save leaves only that temporary directory; it never counts as a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax

from .bundle import Loaded
from .config import ConfigError, config_from_dict

RUN_FILE = "fmzoo_run.json"
RUN_FORMAT = "fmzoo-train-run/1"
CKPT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
MANIFEST = "fmzoo_sha256.json"
MANIFEST_FORMAT = "fmzoo-sha256/1"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's atomicity_types.TMP_DIR_SUFFIX
# orbax stamps the commit time into the step's own metadata file after the manifest is written
_UNHASHED = frozenset({MANIFEST, "_CHECKPOINT_METADATA"})


class CheckpointError(ValueError):
    """A workdir or checkpoint that cannot be used as asked."""


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_run_file(workdir: str) -> dict:
    """The run file as a dict, with the model config parsed under 'config'."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{workdir!r} is not a training workdir (no {RUN_FILE}); "
                              "pass a directory written by `fmzoo train`")
    try:
        with open(path) as f:
            run = json.load(f)
        run["config"] = config_from_dict(run["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); restore it from "
                              "a backup or start a new workdir") from None
    return run


# ---------------------------------------------------------------------------- steps, checksums


def committed_steps(ckpt_dir: str) -> list[int]:
    """Finished steps in ascending order; orbax's unfinished temporary directories are not."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def unfinished_steps(ckpt_dir: str) -> list[str]:
    """Temporary step directories a killed save left behind (names)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(n for n in os.listdir(ckpt_dir) if TMP_SUFFIX in n)


def has_checkpoints(workdir: str) -> bool:
    """True when the workdir holds a finished checkpoint (an interrupted first save does not
    count, so such a workdir can be started again)."""
    return bool(committed_steps(os.path.join(workdir, CKPT_DIR)))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), step_dir)
            if rel not in _UNHASHED:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """Records the sha256 of every file of a (not yet committed) step directory."""
    files = {rel: _sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir)}
    write_json_atomic(os.path.join(step_dir, MANIFEST),
                      {"format": MANIFEST_FORMAT, "files": files})


def step_damage(step_dir: str) -> str | None:
    """None when every file of the step matches its recorded checksum, else what is wrong
    (naming the file)."""
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"not of format {MANIFEST_FORMAT}")
    except FileNotFoundError:
        return f"it has no checksum file {MANIFEST}, so it was not completed by fmzoo"
    except (ValueError, KeyError, TypeError) as e:
        return f"its checksum file {MANIFEST} is unreadable ({e})"
    for rel, digest in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"file {rel} is missing"
        if _sha256(full) != digest:
            return f"file {rel} does not match its sha256 checksum"
    return None


def damaged_message(ckpt_dir: str, step: int, damage: str, intact: int | None) -> str:
    hint = (f"load step={intact} (intact) instead" if intact is not None
            else "no earlier intact step exists")
    return (f"the checkpoint at step {step} in {ckpt_dir} cannot be read: {damage}; it is "
            f"corrupt or incomplete. {hint[0].upper() + hint[1:]}, or restore "
            f"{os.path.join(ckpt_dir, str(step))} from a backup")


def latest_intact(ckpt_dir: str, below: int | None = None) -> int | None:
    for s in reversed(committed_steps(ckpt_dir)):
        if (below is None or s < below) and step_damage(os.path.join(ckpt_dir, str(s))) is None:
            return s
    return None


# ---------------------------------------------------------------------------- param trees


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_mismatch(expected: Any, found: Any, limit: int = 6) -> str | None:
    """None when the two param trees agree in keys and shapes, else a readable diff."""
    want, have = _flat_shapes(expected), _flat_shapes(found)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = []

    def cut(xs):
        return ", ".join(xs[:limit]) + (f" and {len(xs) - limit} more" if len(xs) > limit else "")
    if missing:
        parts.append(f"missing from the checkpoint: {cut(missing)}")
    if extra:
        parts.append(f"in the checkpoint but not in the model: {cut(extra)}")
    if shapes:
        parts.append("different shapes: " + cut([f"{k} {have[k]} vs model {want[k]}"
                                                 for k in shapes]))
    return "; ".join(parts) or None


def config_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}={a.get(k)!r} (checkpoint) vs {b.get(k)!r}" for k in keys)


def abstract_like(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                        shapes, shardings)


def apply_overrides(config: Any, dtype: str | None, overrides: dict) -> Any:
    """The stored config with `dtype` (compute and param dtype) and `overrides` applied;
    refuses any field that would change a parameter's shape (the stored params fix them)."""
    from .registry import param_shapes

    if dtype is not None:
        overrides = {**overrides, "dtype": dtype, "param_dtype": dtype}
    if not overrides:
        return config
    new = config.replace(**overrides)  # unknown fields / bad values raise ConfigError here

    def shapes(c):
        return _flat_shapes(param_shapes(c))
    before = shapes(config)
    if shapes(new) != before:
        culprits = [k for k in overrides if shapes(config.replace(**{k: overrides[k]})) != before]
        if "scan_layers" in culprits:  # a layout change, not another architecture
            raise ConfigError(
                "scan_layers changes the stored params' layout (layers_0.. vs one stacked "
                "`layers`); load without it and convert with fmzoo.models.scan."
                "with_scan_layers(loaded, True), or pass scan_layers to fmzoo.load, "
                "which converts")
        raise ConfigError(
            f"override(s) {', '.join(culprits or sorted(overrides))} would change the shapes of "
            "the stored parameters; a workdir can only change fields like dtype, "
            "attention_impl, dropout or remat. Train a new model for another architecture")
    return new


# ---------------------------------------------------------------------------- the reader


def _restore_params(step_dir: str, shapes: Any, shardings: Any, where: str) -> Any:
    import orbax.checkpoint as ocp
    from etils import epath  # orbax's path type

    item = epath.Path(step_dir) / "params"
    handler = ocp.StandardCheckpointHandler()  # the item alone: no manager, no step metadata
    try:
        try:
            found = handler.metadata(item)
            found = getattr(found, "tree", found)
        except Exception as e:  # orbax raises several types for unreadable metadata
            raise CheckpointError(f"{where} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:300]}); it is corrupt or incomplete") from None
        diff = describe_mismatch(shapes, found)
        if diff:
            raise CheckpointError(f"{where} does not match its own config: {diff}; the "
                                  "workdir was edited by hand, restore it from a backup")
        try:
            return handler.restore(item, args=ocp.args.StandardRestore(
                abstract_like(shapes, shardings)))
        except Exception as e:
            raise CheckpointError(f"{where} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:300]}); it is corrupt or incomplete") from None
    finally:
        handler.close()


def _lora_spec(run: dict, path: str) -> Any:
    """The LoraSpec of a LoRA run's workdir, else None."""
    if "lora" not in run:
        return None
    from .lora import LoraError, LoraSpec
    try:
        return LoraSpec.from_dict(run["lora"])
    except LoraError as e:
        raise CheckpointError(f"the 'lora' entry of {os.path.join(path, RUN_FILE)} is corrupt "
                              f"({e}); restore it from a backup") from None


def _actor_critic_part(stored: Any, part: str, dtype: str | None, overrides: dict
                       ) -> tuple[Any, Any]:
    """(the config to restore: the pair with `part` overridden, the part's own config)."""
    if part not in ("policy", "value"):
        raise CheckpointError(f"part={part!r}: a PPO workdir holds 'policy' and 'value'")
    sub = apply_overrides(getattr(stored, part), dtype, overrides)
    return stored.replace(**{part: sub}), sub


def load_workdir(path: str, *, mesh: Any = None, step: int | None = None,
                 dtype: str | None = None, part: str = "policy", **overrides) -> Loaded:
    """The latest (or given) checkpoint's params with model, config and tokenizer.

    Every file of the step is checked against its sha256 first. Params go onto `mesh` by the
    zoo's sharding rules, or onto the first local device. `dtype` sets the compute and param
    dtype (params are cast on restore); `overrides` may change config fields that keep the
    parameter shapes (attention_impl, dropout, remat, ...). A PPO workdir (an actor-critic
    pair) gives its policy, an LM like any other; part="value" gives its value model (a
    DecoderLM with a score head, read at every position by ActorCritic.values).
    """
    from jax.sharding import SingleDeviceSharding

    from . import registry
    from .config import ActorCriticConfig
    from .tokenizer import load_tokenizer

    path = os.path.abspath(os.path.expanduser(path))
    run = read_run_file(path)
    if isinstance(run["config"], ActorCriticConfig):
        config, part_config = _actor_critic_part(run["config"], part, dtype, overrides)
    elif part != "policy":
        raise CheckpointError(f"part={part!r} reads a PPO workdir (`fmzoo ppo`); {path} holds "
                              f"a {run['config'].family} model: leave part out")
    else:
        config = part_config = apply_overrides(run["config"], dtype, overrides)
    lora_spec = _lora_spec(run, path)
    ckpt_dir = os.path.join(path, CKPT_DIR)
    steps = committed_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"the workdir {path} has no checkpoint yet (nothing in "
                              f"{ckpt_dir}); train with --save-every or let a run finish")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {ckpt_dir}; available: {steps}")
    step_dir = os.path.join(ckpt_dir, str(step))
    damage = step_damage(step_dir)
    if damage:
        raise CheckpointError(damaged_message(ckpt_dir, step, damage,
                                              latest_intact(ckpt_dir, below=step)))
    if lora_spec is None:
        shapes = registry.param_shapes(config)
    else:  # a LoRA run saved {"base": params, "lora": adapters}: merged at the stored dtype
        from . import lora
        shapes = lora.tree_shapes(run["config"], lora_spec)
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), shapes)
    elif lora_spec is None:
        shardings = registry.param_shardings_for(config, mesh)
    else:
        shardings = lora.tree_shardings(config, lora_spec, mesh)
    params = _restore_params(step_dir, shapes, shardings,
                             f"the checkpoint at step {step} in {ckpt_dir}")
    if lora_spec is not None:  # every consumer (generate, export, eval) sees a plain model
        want = registry.param_shapes(config)  # the dtype asked for
        params = jax.jit(lambda t: jax.tree.map(lambda x, w: x.astype(w.dtype),
                                                lora.merge_tree(t, lora_spec), want),
                         out_shardings=shardings["base"])(params)
    if part_config is not config:  # the actor-critic's one half
        params, config = params[part], part_config
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    return Loaded(registry.build(config), params, config, tokenizer, source=path,
                  generation=_generation(run, path))


def _generation(run: dict, path: str) -> Any:
    """The generation defaults of the weights the run started from (an HF directory's EOS
    list and sampling settings, recorded by starting_point), or None: the config's own."""
    from .generation import GenerationDefaults
    gen = (run.get("init") or {}).get("generation")
    if gen is None:
        return None
    return GenerationDefaults.from_hf({}, gen, where=f"{os.path.join(path, RUN_FILE)} (init)")
