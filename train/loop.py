"""The training loop behind `fmzoo train`: check everything, then step, log, evaluate, save.

All settings live in one TrainConfig (stored in DIR/fmzoo_run.json). Every check that can
fail (model, dataset, lengths, mesh, batch, workdir, checkpoint) runs before the first step.
A resumed run restores params, optimiser state, rng, data-iterator position and tokens seen
from the latest checkpoint, drops the metrics logged after it, and continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np

from fmzoo.models import registry
from fmzoo.models.config import ConfigError, LMConfig

from . import checkpoint as ckpt_lib
from .losses import data_kind, make_loss
from .mesh import check_batch_size, make_mesh, put_batch
from .metrics import MetricsWriter, plot_metrics, truncate_metrics
from .optim import lr_schedule, make_optimizer
from .state import sharded_init, state_shapes, state_shardings
from .step import (make_eval_step, make_pmap_step, make_train_step, replicate, shard_batch,
                   unreplicate)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


@dataclasses.dataclass
class TrainConfig:
    workdir: str
    model: str = "gpt-tiny"
    data: str = "python_docs"
    steps: int = 1800
    overrides: dict = dataclasses.field(default_factory=dict)  # model config fields
    data_options: dict = dataclasses.field(default_factory=dict)  # dataset builder knobs
    batch_size: int = 16  # global, over all processes
    seq_len: int = 128  # LM rows; for seq2seq the default source and target length
    src_len: int | None = None
    tgt_len: int | None = None
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    accum: int = 1
    mesh: str | None = None
    pmap: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 200
    keep: int = 3
    async_save: bool = True
    resume: bool = False
    sample_prompt: str = "def "
    sample_tokens: int = 96  # 0: no sample at eval
    data_dir: str | None = None
    tokenizer: str | None = None  # a tokenizer directory; default the byte tokenizer
    progress: bool = True
    stop_after: int | None = None  # leave the loop after this step without a final save (tests)

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("resume", "progress", "stop_after", "workdir"):
            d.pop(k)
        return d


def _tokenizer(cfg: TrainConfig, config: Any):
    from fmzoo.models.tokenizer import ByteTokenizer, load_tokenizer
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                          f"is {config.vocab_size}; pass vocab_size={tok.vocab_size} or another "
                          "--tokenizer")
    return tok


def _lengths(cfg: TrainConfig, config: Any) -> dict:
    if isinstance(config, LMConfig):
        lengths = {"seq_len": cfg.seq_len}
    else:
        lengths = {"src_len": cfg.src_len or cfg.seq_len, "tgt_len": cfg.tgt_len or cfg.seq_len}
    for name, n in lengths.items():
        if n > config.max_len:
            raise ConfigError(
                f"--{name.replace('_', '-')} {n} is longer than the model's maximum length "
                f"max_len={config.max_len}; use --{name.replace('_', '-')} {config.max_len} or "
                f"less (or override max_len=..., for models with learned positions this "
                "changes the parameter shapes)")
        if n < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {n}")
    return lengths


def _eval_split(cfg: TrainConfig) -> str | None:
    """The held-out split: 'validation' where the dataset has one, else 'test', else none."""
    if cfg.data.startswith("algorithmic/"):
        return "test"
    if cfg.data == "python_docs":
        return "validation"
    from .data import load_source
    for split in ("validation", "test"):
        try:
            load_source(cfg.data, split, data_dir=cfg.data_dir, **cfg.data_options)
            return split
        except ValueError:  # the data module's "has no split" error
            continue
    return None


def _batches(cfg: TrainConfig, config: Any, tok, lengths: dict, split: str, **kw):
    from . import data
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, data_dir=cfg.data_dir, **kw,
                  **lengths, **cfg.data_options)
    if isinstance(config, LMConfig):
        return data.lm_batches(cfg.data, tok, split=split, **common)
    return data.seq2seq_batches(cfg.data, tok, split=split, **common)


def _check_workdir(cfg: TrainConfig, config: Any) -> tuple[ckpt_lib.Checkpointer, int | None]:
    workdir = cfg.workdir
    run_file = os.path.join(workdir, ckpt_lib.RUN_FILE)
    if cfg.resume:
        run = ckpt_lib.read_run_file(workdir)
        if run["config"] != config:
            raise ConfigError(
                f"--resume: the model differs from the one in {run_file} ("
                f"{ckpt_lib.config_diff(run['model_config'], config.to_dict())}); use the "
                "same --model and overrides, or a new workdir")
    elif os.path.isdir(os.path.join(workdir, ckpt_lib.CKPT_DIR)) and \
            os.listdir(os.path.join(workdir, ckpt_lib.CKPT_DIR)):
        raise ckpt_lib.CheckpointError(
            f"{workdir} already holds checkpoints; pass --resume to continue that run, or "
            "choose a new --workdir")
    ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.keep, async_save=cfg.async_save)
    step = ckpt.latest_step()
    if cfg.resume and step is None:
        ckpt.close()
        raise ckpt_lib.CheckpointError(
            f"--resume: no checkpoint in {ckpt.directory}; start without --resume")
    return ckpt, step


def _sample(cfg, model, params, config, tok, eval_batch) -> str | None:
    """A greedy continuation of the prompt (LM) or of the first eval source (seq2seq)."""
    try:
        from fmzoo.infer import generate
    except ImportError as e:
        return f"(no sample: fmzoo.infer.generate is unavailable: {e})"
    if jax.process_count() > 1:  # generate() reads its output on the host: one process only
        return "(no sample in multi-process runs; load the workdir with fmzoo.load to sample)"
    eos = config.eos_id
    if isinstance(config, LMConfig):
        prompt = [tok.bos_id] + tok.encode(cfg.sample_prompt)
        out = generate(model, params, [prompt], max_new_tokens=cfg.sample_tokens, eos_id=eos)[0]
        return cfg.sample_prompt + tok.decode(out)
    src = [int(t) for t, m in zip(eval_batch["src"][0], eval_batch["src_mask"][0]) if m]
    want = [int(t) for t, m in zip(eval_batch["tgt_out"][0], eval_batch["tgt_mask"][0]) if m]
    out = generate(model, params, [src], max_new_tokens=len(want) + 4, eos_id=eos)[0]
    return f"{tok.decode(src)} -> {tok.decode(out)}   (target: {tok.decode(want)})"


@dataclasses.dataclass
class Prepared:
    """Everything checked and built before the first step (see `prepare`)."""
    cfg: TrainConfig
    config: Any
    tokenizer: Any
    lengths: dict
    mesh: Any
    train_it: Any
    eval_split: str | None
    ckpt: ckpt_lib.Checkpointer
    start: int | None


def prepare(cfg: TrainConfig) -> Prepared:
    """All the checks (model, dataset, lengths, mesh, batch, workdir), nothing trained yet.

    Raises ConfigError / MeshError / CheckpointError / ValueError with the fix in the message.
    """
    config = registry.get_config(cfg.model, **cfg.overrides)
    from . import data
    kind = data.dataset_kind(cfg.data, data_dir=cfg.data_dir)  # unknown names raise here
    if kind != data_kind(config):
        example = "python_docs" if data_kind(config) == "lm" else "algorithmic/reverse"
        raise ConfigError(f"model {cfg.model!r} needs a {data_kind(config)} dataset but "
                          f"{cfg.data!r} is a {kind} dataset; e.g. {example}")
    lengths = _lengths(cfg, config)
    tok = _tokenizer(cfg, config)
    if cfg.accum < 1 or cfg.steps < 1:
        raise ConfigError("--accum and --steps must be >= 1")
    if cfg.pmap:
        devices = jax.local_devices()
        mesh = make_mesh("data=1", devices[:1])  # eval runs on one device
        if cfg.batch_size % (len(devices) * cfg.accum * jax.process_count()):
            raise ConfigError(f"--pmap: the batch size {cfg.batch_size} must be a multiple of "
                              f"{len(devices)} devices x --accum {cfg.accum}")
    else:
        mesh = make_mesh(cfg.mesh)
        check_batch_size(cfg.batch_size, mesh)
        per_shard = cfg.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
        if per_shard % cfg.accum:
            raise ConfigError(f"--accum {cfg.accum} must divide the per-shard batch {per_shard}")
    train_it = _batches(cfg, config, tok, lengths, "train")
    eval_split = _eval_split(cfg)
    ckpt, start = _check_workdir(cfg, config)
    return Prepared(cfg, config, tok, lengths, mesh, train_it, eval_split, ckpt, start)


def train(cfg: TrainConfig | Prepared) -> dict:
    """Runs (or resumes) training; returns a summary {'step', 'loss', 'eval_loss', ...}."""
    p = cfg if isinstance(cfg, Prepared) else prepare(cfg)
    try:
        return _run(p)
    finally:
        p.ckpt.close()


def _run(p: Prepared) -> dict:
    import tqdm

    cfg, config, tok, lengths, mesh = p.cfg, p.config, p.tokenizer, p.lengths, p.mesh
    train_it, ckpt, start = p.train_it, p.ckpt, p.start
    model = registry.build(config)
    tx = make_optimizer(cfg.lr, cfg.steps, warmup_steps=cfg.warmup,
                        weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    schedule = lr_schedule(cfg.lr, cfg.steps, cfg.warmup)
    loss_fn = make_loss(model, config)
    tokens_seen = 0
    if start is None:
        state, shardings = sharded_init(config, tx, mesh, cfg.seed)
        os.makedirs(cfg.workdir, exist_ok=True)
        ckpt_lib.write_run_file(cfg.workdir, config, cfg.settings())
        if jax.process_index() == 0:
            tok.save(os.path.join(cfg.workdir, ckpt_lib.TOKENIZER_DIR))
        truncate_metrics(cfg.workdir, 0)
        start = 0
    else:
        shapes = state_shapes(config, tx, cfg.seed)
        shardings = state_shardings(config, shapes, mesh)
        state, meta = ckpt.restore(start, ckpt_lib.abstract_like(shapes, shardings), config)
        states = meta["data_states"]
        if len(states) != jax.process_count():
            raise ckpt_lib.CheckpointError(
                f"the checkpoint at step {start} was written by {len(states)} process(es) but "
                f"this run has {jax.process_count()}; resume with {len(states)} processes")
        try:
            train_it.set_state(states[jax.process_index()])
        except ValueError as e:  # e.g. --data or --seq-len changed since the checkpoint
            raise ckpt_lib.CheckpointError(
                f"--resume: cannot continue the data stream: {e}") from None
        tokens_seen = int(meta.get("tokens_seen", 0))
        truncate_metrics(cfg.workdir, start)
    if cfg.pmap:
        n_dev = jax.local_device_count()
        step_fn = make_pmap_step(loss_fn, tx, accum_steps=cfg.accum)
        state = replicate(state)
        feed = lambda b: shard_batch(b, n_dev)  # noqa: E731
        host_state = lambda s: jax.device_put(unreplicate(s), shardings)  # noqa: E731
    else:
        step_fn = make_train_step(loss_fn, tx, mesh, shardings, accum_steps=cfg.accum)
        feed = lambda b: put_batch(b, mesh)  # noqa: E731
        host_state = lambda s: s  # noqa: E731
    eval_step = make_eval_step(make_loss(model, config, deterministic=True), mesh,
                               shardings.params)
    writer = MetricsWriter(cfg.workdir)
    pending: list[tuple[int, dict]] = []
    summary: dict[str, Any] = {"workdir": cfg.workdir, "start_step": start}
    t_last, step_last = time.perf_counter(), start

    def flush(step: int) -> None:
        nonlocal tokens_seen, t_last, step_last
        rows = jax.device_get(pending)
        pending.clear()
        dt = time.perf_counter() - t_last
        for s, m in rows:
            m = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()}
            if not math.isfinite(m["loss"]):
                last = ckpt.latest_step()
                where = (f"the last good checkpoint (step {last}) in {ckpt.directory} is intact"
                         if last is not None else "no checkpoint had been written yet")
                raise TrainingDiverged(
                    f"loss became {m['loss']} at step {s}; stopping. {where}. Lower --lr "
                    f"(now {cfg.lr}), raise --warmup or keep --clip-norm, then --resume")
            tokens_seen += int(m.pop("tokens"))
            m.update(perplexity=math.exp(min(m["loss"], 50.0)), tokens_seen=tokens_seen,
                     lr=float(schedule(s - 1)))
            writer.write(s, m)
            summary.update(step=s, loss=m["loss"])
        if rows and dt > 0:
            steps_done = step - step_last
            summary["steps_per_s"] = steps_done / dt
            summary["tokens_per_s"] = steps_done * cfg.batch_size * max(lengths.values()) / dt
        t_last, step_last = time.perf_counter(), step
        if rows:
            bar.set_postfix(loss=f"{summary['loss']:.3f}")

    def evaluate(step: int, params) -> None:
        # Every process reads the same global eval batches and feeds its own rows of them,
        # so the eval loss does not depend on the number of processes.
        if p.eval_split is None:
            tqdm.tqdm.write(f"step {step}: no eval ({cfg.data} has no validation or test split)")
            return
        it = _batches(cfg, config, tok, lengths, p.eval_split, shuffle=False, num_epochs=1,
                      shard_index=0, shard_count=1)
        rows = cfg.batch_size // jax.process_count()
        mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
        tot, n, first = 0.0, 0.0, None
        for i, b in zip(range(cfg.eval_batches), it):
            first = first or b
            m = jax.device_get(eval_step(params, put_batch({k: v[mine] for k, v in b.items()},
                                                           mesh)))
            tot, n = tot + float(m["loss"]) * float(m["tokens"]), n + float(m["tokens"])
        eval_loss = tot / max(n, 1.0)
        writer.write(step, {"eval_loss": eval_loss,
                            "eval_perplexity": math.exp(min(eval_loss, 50.0))})
        summary["eval_loss"] = eval_loss
        sample = (_sample(cfg, model, params, config, tok, first)
                  if first and cfg.sample_tokens > 0 else None)
        if jax.process_index() == 0:
            tqdm.tqdm.write(f"step {step}: eval loss {eval_loss:.4f}" +
                            (f"\n  sample: {sample!r}" if sample else ""))
        if sample:
            writer.text(step, "sample", sample)
            summary["sample"] = sample

    bar = tqdm.tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
                    disable=not cfg.progress or jax.process_index() != 0, dynamic_ncols=True)
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(train_it)
            state, metrics = step_fn(state, feed(batch))
            pending.append((step, metrics))
            bar.update(1)
            last = step == cfg.steps
            save = last or step % cfg.save_every == 0
            evaluate_now = last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
            if save or evaluate_now or step % cfg.log_every == 0:
                flush(step)  # also the NaN check, so a diverged state is never saved
            if save:
                data_states = ckpt_lib.allgather_json(train_it.get_state())  # one per process
                ckpt.save(host_state(state), {
                    "model_config": config.to_dict(), "data_states": data_states,
                    "tokens_seen": tokens_seen, "step": step})
            if evaluate_now:
                evaluate(step, host_state(state).params)
            if cfg.stop_after is not None and step >= cfg.stop_after:
                flush(step)
                break
    finally:
        bar.close()
        writer.close()
    summary["tokens_seen"] = tokens_seen
    if jax.process_index() == 0:
        summary["plot"] = plot_metrics(cfg.workdir)
    return summary
