"""LoRA adapters (Hu et al., 2021) as pure functions over param pytrees; no model edits.

A targeted kernel W (any DenseGeneral shape [in..., out...]) gets two factors

    lora_a  [in..., R]   drawn like PEFT's kaiming-uniform A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    lora_b  [R, out...]  zero, so the adapted model starts as the base model exactly

and the adapted weight is W + (alpha / R) * A @ B (the factors flattened to 2-d and the
product reshaped to W's shape). The adapters tree mirrors the params: the kernel at
`layers_0/attn/query/kernel` has its pair at `layers_0/attn/query/{lora_a,lora_b}`.

Which axes of a kernel are its input: the attention output projection `out` [H, D, E]
contracts every axis but its last; every other kernel (Dense [in, out]; query/key/value
[E, H|K, D]) contracts its first. Boxed adapters keep the kernel's logical names (A: the
input names + None for the rank axis; B: None + the output names), so the zoo's one rules
table shards them like their kernels.

A training workdir of a LoRA run stores params as {"base": params, "lora": adapters} and its
run file a top-level "lora": LoraSpec.to_dict(); `load_workdir` restores both and returns
the merged params (`merge_tree`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Every decoder LM family names its attention projections query/key/value/out under `attn`
# and its MLP projections up/down (+ gate for SwiGLU) under `mlp`: these two scopes are the
# attention and MLP kernels of every family (the encoder-decoder's cross_attn is not included).
DEFAULT_TARGETS: tuple[str, ...] = ("attn", "mlp")

# Hugging Face (PEFT) module names of Llama-style checkpoints -> the zoo's names.
ALIASES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "out",
           "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "self_attn": "attn"}

# modules whose kernel contracts all but its last axis ([H, D, E] -> E)
_MULTI_IN = frozenset({"out"})

LORA_KEYS = ("lora_a", "lora_b")


class LoraError(ValueError):
    """A LoRA setting that cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and target modules; scale = alpha / rank.

    A target names a module holding a kernel (`query`, `up`, `lm_head`), a scope holding
    several (`attn`, `mlp`), or a path of either (`attn/out`, `layers_0/mlp`): it selects every
    kernel whose module path contains those names in a row. Hugging Face names (q_proj,
    o_proj, gate_proj, ...) are accepted and stored as the zoo's names.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be an integer >= 1, got {self.rank!r}; "
                            "pass e.g. --lora-rank 8")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise LoraError(f"LoRA alpha must be a number > 0, got {self.alpha!r}; pass e.g. "
                            "--lora-alpha 16 (the update is scaled by alpha / rank)")
        targets = self.targets
        if isinstance(targets, str):
            targets = targets.split(",")
        if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) for t in targets):
            raise LoraError(f"LoRA targets must be module names, got {self.targets!r}")
        targets = tuple(t.strip().strip("/") for t in targets)
        if not targets or any(not t for t in targets):
            raise LoraError(f"LoRA targets must be non-empty module names, got "
                            f"{self.targets!r}; e.g. --lora-targets query,value or attn,mlp")
        targets = tuple("/".join(ALIASES.get(p, p) for p in t.split("/")) for t in targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Any) -> "LoraSpec":
        if not isinstance(d, dict):
            raise LoraError(f"a LoRA spec must be a JSON object, got {type(d).__name__}")
        fields = {"rank", "alpha", "targets"}
        extra, missing = sorted(set(d) - fields), sorted({"rank", "alpha"} - set(d))
        if extra or missing:
            raise LoraError(f"a LoRA spec has the keys rank, alpha and targets; "
                            f"{'unknown: ' + ', '.join(extra) if extra else ''}"
                            f"{'; ' if extra and missing else ''}"
                            f"{'missing: ' + ', '.join(missing) if missing else ''}")
        return cls(rank=d["rank"], alpha=d["alpha"],
                   targets=tuple(d.get("targets", DEFAULT_TARGETS)))

    def validate(self, params: Any) -> None:
        """Raises LoraError when a target matches no kernel of `params` or the rank exceeds a
        targeted kernel's smaller side; does nothing else."""
        targeted(params, self)


# ----------------------------------------------------------------------------- paths


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _unbox(x: Any) -> Any:
    return x.value if _is_box(x) else x


def _key_name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _kernels(params: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(module path, kernel leaf) for every >= 2-d leaf named `kernel`."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
        names = tuple(_key_name(k) for k in path)
        if names and names[-1] == "kernel" and len(_unbox(leaf).shape) >= 2:
            out.append((names[:-1], leaf))
    return out


def _matches(target: str, module_path: tuple[str, ...]) -> bool:
    parts = tuple(target.split("/"))
    n = len(parts)
    return any(module_path[i:i + n] == parts for i in range(len(module_path) - n + 1))


def n_in_axes(module_path: tuple[str, ...], ndim: int) -> int:
    """How many leading axes of the module's kernel are its input axes."""
    return ndim - 1 if module_path[-1] in _MULTI_IN else 1


def _module_names(kernels) -> str:
    """The names a target can use: kernel modules and the scopes above them (no layer
    numbers)."""
    leaves = sorted({p[-1] for p, _ in kernels})
    scopes = sorted({n for p, _ in kernels for n in p[:-1]
                     if not n.rstrip("0123456789").endswith("_")} - set(leaves))
    return (f"modules {', '.join(leaves)}" + (f"; scopes {', '.join(scopes)}" if scopes else ""))


def targeted(params: Any, spec: LoraSpec) -> list[tuple[tuple[str, ...], Any, int]]:
    """(module path, kernel leaf, number of input axes) of every kernel the spec targets, in
    tree order; raises LoraError naming the problem before anything is computed."""
    if isinstance(params, dict) and "layers" in params:  # models/scan.py's stacked layout
        raise LoraError("LoRA adapts per-layer kernels, but these params are stacked for "
                        "scan_layers=True; build the model with scan_layers=False (convert "
                        "with fmzoo.models.scan.unstack_layers)")
    kernels = _kernels(params)
    if not kernels:
        raise LoraError("the params hold no kernel to adapt (no 2-d or larger leaf named "
                        "'kernel'); pass a model's params")
    unmatched = [t for t in spec.targets if not any(_matches(t, p) for p, _ in kernels)]
    if unmatched:
        raise LoraError(f"LoRA target(s) {', '.join(unmatched)} match no kernel of this model; "
                        f"it has {_module_names(kernels)} (a target may also be a path such as "
                        "attn/out)")
    out, small = [], []
    for path, leaf in kernels:
        if any(_matches(t, path) for t in spec.targets):
            shape = _unbox(leaf).shape
            n_in = n_in_axes(path, len(shape))
            side = min(math.prod(shape[:n_in]), math.prod(shape[n_in:]))
            if spec.rank > side:
                small.append(f"{'/'.join(path)} ({side})")
            out.append((path, leaf, n_in))
    if small:
        raise LoraError(f"LoRA rank {spec.rank} is larger than the smaller side of "
                        f"{', '.join(small[:4])}{' and more' if len(small) > 4 else ''}; "
                        "lower --lora-rank or leave those modules out of --lora-targets")
    return out


def check_spec(params: Any, spec: LoraSpec) -> None:
    """spec.validate(params): the targets and rank against a model's params (abstract
    ShapeDtypeStructs are enough, e.g. registry.param_shapes(config))."""
    spec.validate(params)


def _set_in(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _pairs(adapters: Any) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """{module path: (A, B)} of an adapters tree (boxed or not), unboxed."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_box)[0]:
        names = tuple(_key_name(k) for k in path)
        if not names or names[-1] not in LORA_KEYS:
            raise LoraError(f"{'/'.join(names)} is not a LoRA factor (an adapters tree holds "
                            "only lora_a / lora_b leaves); pass the tree init_adapters made")
        found.setdefault(names[:-1], {})[names[-1]] = _unbox(leaf)
    for path, ab in found.items():
        if len(ab) != 2:
            raise LoraError(f"the adapter at {'/'.join(path)} has only {', '.join(ab)}; "
                            "it needs lora_a and lora_b")
    return {p: (ab["lora_a"], ab["lora_b"]) for p, ab in found.items()}


# ----------------------------------------------------------------------------- the adapters


def init_adapters(params: Any, spec: LoraSpec, rng: jax.Array, *, boxed: bool = False,
                  dtype: Any = None) -> Any:
    """{module path...: {"lora_a": A [in..., R], "lora_b": B [R, out...]}} for every targeted
    kernel, in the kernel's dtype (or `dtype`). From boxed params (or with boxed=True, which
    needs them) the leaves are `nn.Partitioned` with the kernels' logical names. Works
    under `jax.eval_shape` with abstract params (for shapes and shardings)."""
    found = targeted(params, spec)
    from_boxed = any(_is_box(leaf) for _, leaf, _ in found)
    if boxed and not from_boxed:
        raise LoraError("boxed adapters need boxed params to copy the logical axis names "
                        "from: pass registry.init_boxed(...) or registry.boxed_shapes(config)")
    # One draw for every A, sliced: each random.uniform call is a threefry program that
    # takes XLA about a second to compile, and a deep model has hundreds of kernels.
    sizes = [math.prod(_unbox(leaf).shape[:n_in]) * spec.rank for _, leaf, n_in in found]
    u = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    starts = [0, *itertools.accumulate(sizes)][:-1]
    out: dict = {}
    for (path, leaf, n_in), start, size in zip(found, starts, sizes):
        w = _unbox(leaf)
        dt = w.dtype if dtype is None else jnp.dtype(dtype)
        in_shape, out_shape = tuple(w.shape[:n_in]), tuple(w.shape[n_in:])
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT's kaiming_uniform(a=sqrt(5))
        a = (bound * u[start:start + size]).reshape(in_shape + (spec.rank,)).astype(dt)
        b = jnp.zeros((spec.rank,) + out_shape, dt)
        if from_boxed:
            names = tuple(leaf.names)
            a = nn.Partitioned(a, names=names[:n_in] + (None,), mesh=leaf.mesh)
            b = nn.Partitioned(b, names=(None,) + names[n_in:], mesh=leaf.mesh)
        _set_in(out, path, {"lora_a": a, "lora_b": b})
    return out


def _product(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B in fp32, shaped [in..., out...]."""
    r = a.shape[-1]
    if b.shape[0] != r:
        raise LoraError(f"lora_a has rank {r} but lora_b {b.shape[0]}; the adapters are "
                        "corrupt, make them again with init_adapters")
    ab = jnp.matmul(a.reshape(-1, r).astype(jnp.float32), b.reshape(r, -1).astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    return (scale * ab).reshape(a.shape[:-1] + b.shape[1:])


def delta(adapters: Any, spec: LoraSpec) -> Any:
    """The dense fp32 updates, as a tree {module path...: {"kernel": scale * A @ B}} shaped
    like the params it applies to."""
    out: dict = {}
    for path, (a, b) in _pairs(adapters).items():
        _set_in(out, path, {"kernel": _product(a, b, spec.scale)})
    return out


def merge(params: Any, adapters: Any, spec: LoraSpec) -> Any:
    """params with W + scale * A @ B at every adapted kernel (computed in fp32, cast to W's
    dtype); every other leaf is untouched. `params` may be boxed or not (boxes are kept);
    jit-able."""
    pairs = _pairs(adapters)
    used = set()

    def one(path, leaf):
        names = tuple(_key_name(k) for k in path)
        if not names or names[-1] != "kernel" or names[:-1] not in pairs:
            return leaf
        used.add(names[:-1])
        w = _unbox(leaf)
        d = _product(*pairs[names[:-1]], spec.scale)
        if d.shape != w.shape:
            raise LoraError(f"the adapter at {'/'.join(names[:-1])} makes an update of shape "
                            f"{d.shape}, but the kernel is {w.shape}; the adapters belong to "
                            "another model")
        new = (w.astype(jnp.float32) + d).astype(w.dtype)
        return leaf.replace_boxed(new) if _is_box(leaf) else new

    merged = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_box)
    _check_used(pairs, used)
    return merged


def _check_used(pairs, used) -> None:
    left = sorted("/".join(p) for p in set(pairs) - used)
    if left:
        raise LoraError(f"adapters for {', '.join(left[:4])}{' and more' if len(left) > 4 else ''}"
                        " have no kernel in this model; the adapters belong to another model")


def merge_tree(tree: Any, spec: LoraSpec) -> Any:
    """merge() of a {"base": params, "lora": adapters} tree (what a LoRA run saves)."""
    return merge(tree["base"], tree["lora"], spec)


def trainable_mask(tree: Any) -> Any:
    """Booleans shaped like a {"base", "lora"} tree: False for the base, True for adapters
    (e.g. for optax.masked)."""
    return {"base": jax.tree.map(lambda _: False, tree["base"]),
            "lora": jax.tree.map(lambda _: True, tree["lora"])}


def unmerged_apply(model: nn.Module, params: Any, adapters: Any, spec: LoraSpec,
                   *args, **kwargs) -> Any:
    """model.apply({"params": params}, *args, **kwargs), each adapted module computing
    x @ W + scale * (x @ A) @ B: the LoRA forward without merging (flax's method
    interception around the targeted modules' __call__)."""
    pairs = _pairs(adapters)
    used = set()

    def intercept(next_fun, call_args, call_kwargs, context):
        path = tuple(context.module.path)
        if context.method_name != "__call__" or path not in pairs:
            return next_fun(*call_args, **call_kwargs)
        used.add(path)
        a, b = pairs[path]
        x = call_args[0]
        y = next_fun(*call_args, **call_kwargs)
        n_in = a.ndim - 1  # trailing input axes of x, contracted with A's leading axes
        xa = jnp.tensordot(x.astype(y.dtype), a.astype(y.dtype), axes=n_in)
        return y + spec.scale * jnp.tensordot(xa, b.astype(y.dtype), axes=1)

    with nn.intercept_methods(intercept):
        out = model.apply({"params": params}, *args, **kwargs)
    _check_used(pairs, used)
    return out


# ----------------------------------------------------------------------------- workdirs


def tree_shapes(config: Any, spec: LoraSpec) -> dict:
    """ShapeDtypeStructs of the {"base", "lora"} params a LoRA run saves; nothing is
    allocated."""
    from . import registry

    base = registry.param_shapes(config)
    lora = jax.eval_shape(functools.partial(init_adapters, spec=spec), base,
                          rng=jax.random.key(0))
    return {"base": base, "lora": lora}


def tree_shardings(config: Any, spec: LoraSpec, mesh: jax.sharding.Mesh) -> dict:
    """NamedShardings of the {"base", "lora"} params under the zoo's rules."""
    from . import registry
    from .sharding import boxed_shardings

    boxed = registry.boxed_shapes(config)
    lora = jax.eval_shape(functools.partial(init_adapters, spec=spec), boxed,
                          rng=jax.random.key(0))
    return {"base": registry.param_shardings_for(config, mesh),
            "lora": boxed_shardings(lora, mesh)}
