"""Hugging Face checkpoints in and out: config.json + safetensors <-> DecoderLM params.

`from_hf(dir)` reads GPT2LMHeadModel and LlamaForCausalLM checkpoints (one model.safetensors,
or shards listed in model.safetensors.index.json) one tensor at a time through the
safetensors library, and places each tensor straight where it belongs: on the default
device, or sharded over a mesh with the zoo's rules. `to_hf(params, config, dir)` writes the
same format back so that `transformers`' `from_pretrained` loads it. torch is never imported.

Only safetensors is read: `pytorch_model.bin` and other .pt/.pth files are pickles, and
unpickling a file can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from .bundle import Loaded
from .config import LMConfig, resolve_dtype
from .generation import GenerationDefaults
from .hf_arch import ARCHITECTURES, CheckpointError, Rule, architecture_for, architecture_of

__all__ = ["from_hf", "to_hf", "CheckpointError", "ARCHITECTURES"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONVERT = ("convert it once with transformers: `AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)`")


def _read_json(path: str) -> dict:
    """A JSON object from `path`; anything else is refused naming the file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt or "
                              "truncated: download or save it again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object; "
                              "it should map config keys to values (download it again)")
    return obj


# config.json sizes that must be integers (None allowed where transformers allows it)
_INT_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner",
             "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
             "num_key_value_heads", "max_position_embeddings", "head_dim")


def _check_config_types(hf: dict, path: str) -> None:
    for key in _INT_KEYS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{path}: {key} must be an integer, got {value!r} (a "
                                  f"{type(value).__name__}); fix that value in config.json")


def _weight_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint; refuses pickle-only directories."""
    if os.path.exists(os.path.join(directory, WEIGHTS)):
        return [os.path.join(directory, WEIGHTS)]
    if os.path.exists(os.path.join(directory, INDEX)):
        weight_map = _read_json(os.path.join(directory, INDEX)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{os.path.join(directory, INDEX)} has no 'weight_map' object; "
                                  "the file is corrupt: download it again")
        files = sorted(set(map(str, weight_map.values())))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{directory}: {INDEX} lists shard(s) that are not there: "
                                  f"{', '.join(missing)}; download the whole checkpoint")
        return [os.path.join(directory, f) for f in files]
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); fmzoo loads "
            f"safetensors only, because unpickling a file can run arbitrary code. {_CONVERT}")
    raise CheckpointError(f"{directory}: no {WEIGHTS} and no {INDEX}; save the model with "
                          "`save_pretrained(dir, safe_serialization=True)`")


class _Checkpoint:
    """Tensor names, shapes and lazy reads over every safetensors file of a checkpoint."""

    def __init__(self, files: list[str], stack: contextlib.ExitStack):
        from safetensors import safe_open
        self.where: dict[str, Any] = {}
        self.file: dict[str, str] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(path, framework="numpy"))
                names = list(handle.keys())
            except Exception as e:  # safetensors raises its own SafetensorError and others
                raise CheckpointError(_unreadable(path, e)) from None
            for name in names:
                self.where[name], self.file[name] = handle, path

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None) -> np.ndarray:
        try:
            if index is None:
                return self.where[name].get_tensor(name)
            return self.where[name].get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(_unreadable(self.file[name], e)) from None


def _unreadable(path: str, error: Exception) -> str:
    return (f"{path} is not a readable safetensors file ({type(error).__name__}: "
            f"{str(error)[:200]}); it is corrupt or truncated: download it again")


def _canonical_names(ckpt: _Checkpoint, arch, config: LMConfig) -> dict[str, str]:
    """canonical name -> stored name, dropping buffers and a redundant tied lm_head."""
    out = {}
    for stored in ckpt.where:
        name = arch.canonical(stored)
        if name is None or (config.tie_embeddings and name == "lm_head.weight"):
            continue
        out[name] = stored
    return out


def _check_tensors(rules: list[Rule], names: dict[str, str], ckpt: _Checkpoint,
                   directory: str) -> None:
    expected = {r.hf: r.hf_shape for r in rules}
    missing = sorted(set(expected) - set(names))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {', '.join(missing)} that "
                              "config.json implies; the checkpoint is incomplete or its "
                              "config.json does not match its weights")
    unexpected = sorted(set(names) - set(expected))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor(s) {', '.join(unexpected)}; "
                              "config.json does not describe these weights")
    for name, shape in expected.items():
        got = ckpt.shape(names[name])
        if got != shape:
            raise CheckpointError(f"{directory}: tensor {name} has shape {got}, but config.json "
                                  f"implies {shape}")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flat_shapes(config: LMConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from .registry import param_shapes
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
    return {tuple(k.key for k in path): tuple(x.shape) for path, x in flat}


def _check_rules(rules: list[Rule], zoo_shapes: dict) -> None:
    covered = {r.zoo for r in rules}
    if covered != set(zoo_shapes):  # a bug in hf_arch, not in the user's input
        raise RuntimeError(f"hf_arch rules do not cover the DecoderLM params: missing "
                           f"{sorted(set(zoo_shapes) - covered)}, extra {sorted(covered - set(zoo_shapes))}")


def _shardings(config: LMConfig, mesh) -> dict[tuple[str, ...], Any]:
    from .registry import logical_axes, param_shapes
    from .sharding import param_shardings
    tree = param_shardings(logical_axes(config), param_shapes(config), mesh)
    return {tuple(k.key for k in path): s
            for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _place(host: np.ndarray, sharding) -> jax.Array:
    """One tensor onto its devices; each device receives only its own shard."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _token_ids(directory: str, hf: dict) -> dict:
    """bos/eos/pad ids from config.json, overridden by generation_config.json."""
    ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.exists(gen_path):
        gen = _read_json(gen_path)
        ids.update({k: gen[k] for k in ids if gen.get(k) is not None})
    return ids


def from_hf(directory: str, dtype: str = "float32", mesh=None,
            compute_dtype: str | None = None, overrides: dict | None = None) -> Loaded:
    """Loads a Hugging Face GPT2LMHeadModel / LlamaForCausalLM directory (safetensors only).

    `dtype` is the param dtype ('float32', 'bfloat16', 'float16'); `compute_dtype` the
    activation dtype (default float32; `fmzoo.load` sets both to its `dtype`). `overrides`
    replace config fields that keep the parameter shapes (attention_impl, dropout, ...).
    With `mesh`, each tensor goes straight onto the mesh with the zoo's sharding rules; the
    full model is never assembled on one device.
    """
    from tqdm.auto import tqdm

    from .registry import build
    from .tokenizer import load_tokenizer

    directory = os.path.expanduser(str(directory))
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{directory}: no config.json; a Hugging Face checkpoint "
                              "directory holds config.json and model.safetensors (write it "
                              "with `save_pretrained(dir, safe_serialization=True)`)")
    np_dtype = resolve_dtype(dtype)
    hf = _read_json(cfg_path)
    arch = architecture_of(hf, cfg_path)
    _check_config_types(hf, cfg_path)
    files = _weight_files(directory)
    ids = _token_ids(directory, hf)
    try:
        config = arch.config_from_hf({**hf, **ids})
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: missing key {e.args[0]!r}, which {arch.name} "
                              "needs; the file is incomplete: download or save it again") from None
    config = config.replace(param_dtype=dtype, dtype=compute_dtype or "float32")
    if overrides:
        from .workdir import apply_overrides
        config = apply_overrides(config, None, overrides)
    # the tokenizer first: a corrupt one fails before any tensor is read
    tokenizer = load_tokenizer(directory, bos_id=config.bos_id, eos_id=config.eos_id,
                               pad_id=config.pad_id)
    rules = arch.rules(config)
    zoo_shapes = _flat_shapes(config)
    _check_rules(rules, zoo_shapes)
    shardings = _shardings(config, mesh) if mesh is not None else {}
    params: dict = {}
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(files, stack)
        names = _canonical_names(ckpt, arch, config)
        _check_tensors(rules, names, ckpt, directory)
        for rule in tqdm(rules, desc=f"loading {os.path.basename(directory.rstrip('/'))}",
                         leave=False):
            piece = ckpt.read(names[rule.hf], rule.piece_index)
            host = rule.to_zoo(piece, zoo_shapes[rule.zoo]).astype(np_dtype)
            _set(params, rule.zoo, _place(host, shardings.get(rule.zoo)))
    return Loaded(build(config), params, config, tokenizer, source=directory,
                  generation=_generation(directory, hf, config))


def _generation(directory: str, hf: dict, config) -> GenerationDefaults:
    """The whole eos_token_id list and the sampling defaults; the config's eos_id comes first."""
    gen_path = os.path.join(directory, "generation_config.json")
    gen = _read_json(gen_path) if os.path.exists(gen_path) else None
    defaults = GenerationDefaults.from_hf(hf, gen, where=gen_path if gen else directory)
    ids = (config.eos_id,) + tuple(i for i in defaults.eos_ids if i != config.eos_id)
    return dataclasses.replace(defaults, eos_ids=ids)


# ----------------------------------------------------------------------------- export


def _host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _export_tensors(params: Any, config: LMConfig, rules: list[Rule]) -> dict[str, np.ndarray]:
    """Checks every param against the config first, then builds the Hugging Face tensors."""
    zoo_shapes = _flat_shapes(config)
    _check_rules(rules, zoo_shapes)
    flat = {tuple(getattr(k, "key", getattr(k, "name", k)) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted("/".join(p) for p in set(zoo_shapes) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(zoo_shapes))
    if missing or extra:
        raise CheckpointError(f"params do not match the config: missing {missing or 'none'}, "
                              f"unexpected {extra or 'none'}")
    for path, shape in zoo_shapes.items():
        if tuple(flat[path].shape) != shape:
            raise CheckpointError(f"param {'/'.join(path)} has shape {tuple(flat[path].shape)}, "
                                  f"but the config implies {shape}")
    pieces: dict[str, list] = {}
    for rule in rules:
        pieces.setdefault(rule.hf, []).append(rule)
    out = {}
    for name, group in pieces.items():
        group.sort(key=lambda r: r.part[0] if r.part else 0)
        arrays = [r.to_hf(_host(flat[r.zoo])) for r in group]
        out[name] = np.ascontiguousarray(np.concatenate(arrays, axis=-1) if len(arrays) > 1
                                         else arrays[0])
    return out


def to_hf(params: Any, config: LMConfig, directory: str, tokenizer: Any = None,
          generation: GenerationDefaults | None = None) -> None:
    """Writes config.json + generation_config.json + model.safetensors (+ the tokenizer) that
    transformers loads. `generation` (default: the config's eos, greedy) goes to
    generation_config.json whole, so an eos_token_id list round-trips.

    GPT-2 flavoured configs become GPT2LMHeadModel (Conv1D [in, out] weights, packed
    c_attn); Llama flavoured ones LlamaForCausalLM. Params keep their dtype.
    """
    from safetensors.numpy import save_file

    if not isinstance(config, LMConfig):
        raise CheckpointError(f"to_hf exports decoder-only LMs (LMConfig); got "
                              f"{type(config).__name__}")
    if config.head != "lm":  # no *ForSequenceClassification export yet
        raise CheckpointError("to_hf exports language models; this is a reward model (config "
                              "head='score'); use it from fmzoo (fmzoo.load + fmzoo.score)")
    directory = os.path.expanduser(str(directory))
    if os.path.exists(os.path.join(directory, INDEX)):
        raise CheckpointError(f"{directory} already holds a sharded checkpoint ({INDEX}); "
                              "export into an empty directory")
    if config.scan_layers:  # Hugging Face checkpoints keep one entry per layer
        from .scan import match_layout
        config = config.replace(scan_layers=False)
        params = match_layout(params, config)
    arch = architecture_for(config)
    hf_config = arch.config_to_hf(config)
    tensors = _export_tensors(params, config, arch.rules(config))
    dtypes = {str(t.dtype) for t in tensors.values()}
    generation = generation or GenerationDefaults.for_config(config)
    gen_json = {"bos_token_id": config.bos_id, "pad_token_id": config.pad_id,
                **generation.to_hf()}
    gen_json.setdefault("eos_token_id", config.eos_id)
    hf_config.update({
        "bos_token_id": config.bos_id, "eos_token_id": gen_json["eos_token_id"],
        "pad_token_id": config.pad_id, "use_cache": True,
        "torch_dtype": dtypes.pop() if len(dtypes) == 1 else "float32"})
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    # write under temporary names and rename, so an interrupted export leaves no torn file
    tmp_weights = os.path.join(directory, WEIGHTS + ".tmp")
    save_file(tensors, tmp_weights, metadata={"format": "pt"})
    tmp_config = os.path.join(directory, "config.json.tmp")
    with open(tmp_config, "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    tmp_gen = os.path.join(directory, "generation_config.json.tmp")
    with open(tmp_gen, "w") as f:
        json.dump(gen_json, f, indent=2, sort_keys=True)
    os.replace(tmp_weights, os.path.join(directory, WEIGHTS))
    os.replace(tmp_config, os.path.join(directory, "config.json"))
    os.replace(tmp_gen, os.path.join(directory, "generation_config.json"))
    if tokenizer is not None:
        tokenizer.save(directory)
