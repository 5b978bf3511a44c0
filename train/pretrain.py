"""The pretraining command behind `fmzoo train`: an LM or seq2seq model on a dataset, from a
preset, a training workdir or a Hugging Face directory, run by the Trainer.

    trainer = prepare(settings)   # every check; raises with the fix, writes nothing
    summary = trainer.run()       # trains, evaluates, saves; --resume continues exactly
"""

from __future__ import annotations

import math
import os
from typing import Any

from .config import Settings, check_with_model, config_error, with_recipe
from .trainer import Task, Trainer, TrainingDiverged  # noqa: F401  (re-exported)


def starting_point(settings: Settings) -> tuple[Any, Any, Any, dict]:
    """(model config, params or None, tokenizer or None, record) for --model: a preset
    (fresh init), a training workdir (its latest checkpoint) or a Hugging Face directory.
    Overrides, --dtype and --remat apply to every kind; a workdir or HF dir refuses those
    that would change its parameters' shapes."""
    from fmzoo.models import registry
    m = settings.model
    overrides = m.config_overrides()
    path = os.path.abspath(os.path.expanduser(m.source))
    if os.path.isdir(path):
        from fmzoo.models import workdir as workdir_lib
        if os.path.exists(os.path.join(path, workdir_lib.RUN_FILE)):
            loaded = workdir_lib.load_workdir(path, **overrides)
            steps = workdir_lib.committed_steps(os.path.join(path, workdir_lib.CKPT_DIR))
            info = {"kind": "workdir", "source": path, "step": steps[-1] if steps else None}
        elif os.path.exists(os.path.join(path, "config.json")):
            from fmzoo.models.hf import from_hf
            loaded = from_hf(path)
            loaded.config = workdir_lib.apply_overrides(loaded.config, None, overrides)
            info = {"kind": "hf", "source": path}
        else:
            raise config_error(
                f"--model {m.source}: the directory is neither a training workdir (no "
                f"{workdir_lib.RUN_FILE}) nor a Hugging Face directory (no config.json); pass "
                "a preset name (see `fmzoo models`), a workdir or an HF directory")
        # the source's EOS id list and sampling defaults travel with the run (fmzoo_run.json),
        # so loading, chatting with or exporting the new workdir keeps them
        info["generation"] = loaded.generation.to_hf()
        return loaded.config, loaded.params, loaded.tokenizer, info
    return registry.get_config(m.source, **overrides), None, None, {"kind": "preset",
                                                                    "source": m.source}


def _tokenizer(settings: Settings, config: Any, found: Any):
    from fmzoo.models.tokenizer import ByteTokenizer, load_tokenizer
    name = settings.data.tokenizer
    if name is not None:
        if not os.path.isdir(name):
            raise config_error(f"--tokenizer {name}: no such directory; pass a directory "
                               "holding tokenizer.json (or leave it out for bytes)")
        tok = load_tokenizer(name)
        if tok is None:
            raise config_error(f"--tokenizer {name}: the directory holds no tokenizer "
                               "(tokenizer.json, tokenizer.model or fmzoo's own record)")
    else:
        tok = found or ByteTokenizer()
    if tok.vocab_size > config.vocab_size:
        raise config_error(f"the tokenizer has {tok.vocab_size} tokens but the model's "
                           f"vocabulary is {config.vocab_size}; pass vocab_size="
                           f"{tok.vocab_size} or another --tokenizer")
    return tok


def _lengths(settings: Settings, config: Any) -> dict:
    from fmzoo.models.config import LMConfig
    d = settings.data
    if isinstance(config, LMConfig):
        lengths = {"seq_len": d.seq_len}
    else:
        lengths = {"src_len": d.src_len or d.seq_len, "tgt_len": d.tgt_len or d.seq_len}
    for name, n in lengths.items():
        flag = "--" + name.replace("_", "-")
        if n > config.max_len:
            raise config_error(
                f"{flag} {n} is longer than the model's maximum length max_len="
                f"{config.max_len}; use {flag} {config.max_len} or less (or override "
                "max_len=..., for models with learned positions this changes the parameter "
                "shapes)")
    return lengths


def _batches(settings: Settings, config: Any, tok, lengths: dict, split: str, **kw):
    from fmzoo.models.config import LMConfig

    from . import data
    d = settings.data
    common = dict(batch_size=d.batch_size, seed=settings.run.seed, data_dir=d.data_dir, **kw,
                  **lengths, **d.options)
    make = data.lm_batches if isinstance(config, LMConfig) else data.seq2seq_batches
    return make(d.name, tok, split=split, **common)


def _sampler(settings: Settings, model, config, tok):
    """A greedy continuation of the prompt (LM) or of the first eval source (seq2seq)."""
    import jax

    from fmzoo.models.config import LMConfig
    e = settings.eval

    def sample(params, eval_batch) -> str | None:
        if e.sample_tokens == 0:
            return None
        try:
            from fmzoo.infer import generate
        except ImportError as err:
            return f"(no sample: fmzoo.infer.generate is unavailable: {err})"
        if jax.process_count() > 1:  # generate() reads its output on the host
            return "(no sample in multi-process runs; load the workdir with fmzoo.load)"
        if isinstance(config, LMConfig):
            prompt = [tok.bos_id] + tok.encode(e.sample_prompt)
            out = generate(model, params, [prompt], max_new_tokens=e.sample_tokens,
                           eos_id=config.eos_id)[0]
            return e.sample_prompt + tok.decode(out)
        src = [int(t) for t, m in zip(eval_batch["src"][0], eval_batch["src_mask"][0]) if m]
        want = [int(t) for t, m in zip(eval_batch["tgt_out"][0], eval_batch["tgt_mask"][0])
                if m]
        out = generate(model, params, [src], max_new_tokens=len(want) + 4,
                       eos_id=config.eos_id)[0]
        return f"{tok.decode(src)} -> {tok.decode(out)}   (target: {tok.decode(want)})"
    return sample


def _perplexity(prefix: str):
    return lambda m: {f"{prefix}perplexity": math.exp(min(m[f"{prefix}loss"], 50.0))}


def resolve_recipe(settings: Settings, config: Any) -> Settings:
    """The optim fields the user left out, filled: on --resume from the run's own record
    (the schedule continues unchanged), else from the model's recipe (models/recipes.py)."""
    from fmzoo.models.recipes import recipe_for, stored_recipe
    if settings.run.resume:
        stored = stored_recipe(os.path.abspath(os.path.expanduser(settings.run.workdir)))
        settings = with_recipe(settings, stored or {})
    return with_recipe(settings, recipe_for(settings.model.source, config=config))


def prepare(settings: Settings, *, stop_after: int | None = None) -> Trainer:
    """Every check (model, dataset, lengths, tokenizer, mesh, batch, workdir), nothing
    written: a Trainer ready to `run()`. Raises ConfigError / MeshError / CheckpointError /
    ValueError with the fix in the message."""
    from fmzoo.models import registry

    from . import data
    from .losses import data_kind, make_loss
    config, params, found_tok, info = starting_point(settings)
    settings = resolve_recipe(settings, config)
    check_with_model(settings, config)
    d = settings.data
    kind = data.dataset_kind(d.name, data_dir=d.data_dir)  # unknown names raise here
    if kind != data_kind(config):
        example = "python_docs" if data_kind(config) == "lm" else "algorithmic/reverse"
        raise config_error(f"model {settings.model.source!r} needs a {data_kind(config)} "
                           f"dataset but {d.name!r} is a {kind} dataset; e.g. {example}")
    lengths = _lengths(settings, config)
    tok = _tokenizer(settings, config, found_tok)
    model = registry.build(config)

    def task() -> Task:  # the Trainer calls it once its own checks passed
        split = data.eval_split(d.name, data_dir=d.data_dir, **d.options)
        return Task(
            loss_fn=make_loss(model, config),
            eval_loss_fn=make_loss(model, config, deterministic=True),
            batches=_batches(settings, config, tok, lengths, "train"),
            eval_batches=None if split is None else lambda: _batches(
                settings, config, tok, lengths, split, shuffle=False, num_epochs=1,
                shard_index=0, shard_count=1),
            metrics=_perplexity(""), eval_metrics=_perplexity("eval_"),
            sample=_sampler(settings, model, config, tok),
            no_eval_reason=f"{d.name} has no validation or test split")
    return Trainer(settings, config, task, init_params=params, init_info=info, tokenizer=tok,
                   stop_after=stop_after)


def train(settings: Settings | Trainer, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) pretraining; returns a summary {'step', 'loss', 'eval_loss', ...}."""
    trainer = settings if isinstance(settings, Trainer) else prepare(settings,
                                                                      stop_after=stop_after)
    return trainer.run()
