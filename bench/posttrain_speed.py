"""Post-training speed: tokens/s of one SFT, one DPO and one GRPO update step, and of the
GRPO rollout (sampling), with fmzoo's own step functions on random weights of a preset.

    python bench/posttrain_speed.py                                  # CPU: llama-tiny
    python bench/posttrain_speed.py --device gpu --preset gpt2-124m --dtype bfloat16 --json

Parts (each printed as soon as it is measured, so a time limit keeps what finished):
  sft      train.sft.sft_loss on --batch rows x --seq-len (the second half of each row
           labelled, segment ids and positions as fmzoo sft feeds them);
  dpo      train.dpo_losses.dpo_step_loss on --pairs pairs = 2 x --pairs rows x --seq-len,
           reference log-probs precomputed (in the batch, as `fmzoo run` does), beta 0.1;
  grpo     train.grpo.grpo_loss (clipped surrogate, beta 0: no reference forward, fmzoo
           grpo's default) on N = --prompts x --generations rows of --prompt-len +
           --max-new-tokens tokens;
  rollout  train.rollout.rollout: --generations sampled completions (temperature 1, no EOS,
           so every completion is --max-new-tokens long) for each of --prompts prompts of
           --prompt-len tokens: the KV-cache decoder GRPO samples with.
Step parts count every position of the step's rows (rows x width) per second; rollout counts
generated tokens per second. Each step runs through train.step.make_train_step (AdamW, the
state donated) on a one-device mesh; times are the mean of --steps calls after --warmup,
the first call (compile + run) reported as compile_s. Params fp32, compute --dtype. If the
fused attention kernel fails on a part (e.g. cuDNN and a mask), the part is retried with
XLA's and says so. Nothing here imports tensorflow-datasets or grain (the GPU image has
neither): tests/test_posttrain_speed.py checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prefill_decode import parse_value  # noqa: E402  (KEY=VALUE override parsing, shared)
from train import time_steps  # noqa: E402
from device import device_mismatch  # noqa: E402

PARTS = ("sft", "dpo", "grpo", "rollout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu", "any"], default="cpu")
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (params stay fp32, as in training)")
    p.add_argument("--attention", default="auto",
                   choices=["auto", "xla", "cudnn", "cpu", "reference"])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. n_layers=1 (a smaller model of the preset)")
    p.add_argument("--batch", type=int, default=8, help="SFT rows per step")
    p.add_argument("--seq-len", type=int, default=128, help="SFT and DPO row length")
    p.add_argument("--pairs", type=int, default=4, help="DPO pairs per step (2x rows)")
    p.add_argument("--prompts", type=int, default=4, help="GRPO / rollout prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed calls per part")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    args = p.parse_args(argv)
    sizes = {k: getattr(args, k) for k in ("batch", "seq_len", "pairs", "prompts",
                                           "generations", "prompt_len", "max_new_tokens",
                                           "steps")}
    bad = [k for k, v in sizes.items() if v < 1] + (["warmup"] if args.warmup < 0 else [])
    if bad:
        p.error(f"--{bad[0].replace('_', '-')} must be >= 1 (>= 0 for --warmup)")
    if args.generations < 2 and "grpo" in args.parts:
        p.error("--generations must be >= 2: GRPO compares a prompt's completions")
    try:
        args.override = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.override)}
    except ValueError:
        p.error(f"--override takes KEY=VALUE pairs (e.g. n_layers=1), got {args.override}")
    return args


def _timed_steps(step, state, batch, warmup: int, steps: int) -> tuple[float, float, object]:
    """(seconds of the first call: compile + run, mean seconds per later call, the state)."""
    import jax
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    per_step, state = time_steps(step, state, batch, warmup, steps)
    return first, per_step, state


class Shared:
    """One train state for every part (the steps donate it and hand back the next one):
    one init instead of one per part; the rollout samples with its params."""

    def __init__(self, config):
        import jax

        from fmzoo.train.mesh import make_mesh
        from fmzoo.train.optim import make_optimizer
        self.config = config
        self.mesh = make_mesh("data=1", jax.devices()[:1])
        self.tx = make_optimizer(1e-5, 1000, warmup_steps=10)
        self._state = self.shardings = None

    @property
    def state(self):
        import jax

        from fmzoo.train.state import sharded_init
        # a step that failed after donating its input leaves deleted buffers: start afresh
        if self._state is None or any(x.is_deleted() for x in jax.tree.leaves(self._state)):
            self._state, self.shardings = sharded_init(self.config, self.tx, self.mesh)
        return self._state

    @state.setter
    def state(self, value):
        self._state = value


def sft_batch(rows: int, T: int, vocab: int, rs) -> dict:
    x = rs.randint(0, min(vocab, 256), (rows, T + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T))
    return dict(inputs=x[:, :-1], targets=x[:, 1:], positions=pos,
                segment_ids=np.ones((rows, T), np.int32),
                loss_mask=(pos >= T // 2).astype(np.float32))


def dpo_batch(pairs: int, T: int, vocab: int, rs) -> dict:
    resp = np.zeros((pairs, 2, T), np.float32)
    resp[..., T // 2:] = 1
    return dict(tokens=rs.randint(3, min(vocab, 256), (pairs, 2, T)).astype(np.int32),
                mask=np.ones((pairs, 2, T), np.int32), response_mask=resp,
                ref_logps=np.full((pairs, 2), -50.0, np.float32))


def grpo_batch(N: int, P: int, M: int, vocab: int, rs) -> dict:
    """An update batch shaped like make_grpo_rollout's: N rows of P prompt + M completion."""
    T = P + M
    resp = np.zeros((N, T), np.float32)
    resp[:, P:] = 1
    old = np.zeros((N, T), np.float32)
    old[:, P - 1:T - 1] = -rs.exponential(2.0, (N, M))  # aligned as targets
    return dict(tokens=rs.randint(0, min(vocab, 256), (N, T)).astype(np.int32),
                mask=np.ones((N, T), np.int32), response_mask=resp, old_logps=old,
                advantages=rs.normal(size=(N,)).astype(np.float32))


def step_part(part: str, config, shared: Shared, args) -> dict:
    from fmzoo.models.registry import build
    from fmzoo.train.dpo_losses import dpo_step_loss
    from fmzoo.train.grpo import grpo_loss
    from fmzoo.train.mesh import put_batch
    from fmzoo.train.sft import sft_loss
    from fmzoo.train.step import make_train_step
    model, rs, V = build(config), np.random.RandomState(0), config.vocab_size
    if part == "sft":
        loss, batch = sft_loss(model, config), sft_batch(args.batch, args.seq_len, V, rs)
        rows, width = args.batch, args.seq_len
    elif part == "dpo":
        loss = dpo_step_loss(model, config, beta=0.1)
        batch = dpo_batch(args.pairs, args.seq_len, V, rs)
        rows, width = 2 * args.pairs, args.seq_len
    else:
        loss = grpo_loss(model, beta=0.0, epsilon=0.2, epsilon_high=0.2, loss_type="grpo",
                         temperature=1.0, max_new_tokens=args.max_new_tokens)
        rows, width = args.prompts * args.generations, args.prompt_len + args.max_new_tokens
        batch = grpo_batch(rows, args.prompt_len, args.max_new_tokens, V, rs)
    state = shared.state
    step = make_train_step(loss, shared.tx, shared.mesh, shared.shardings)
    first, dt, shared.state = _timed_steps(step, state, put_batch(batch, shared.mesh),
                                           args.warmup, args.steps)
    return {"rows": rows, "seq_len": width, "compile_s": first, "ms_per_step": 1e3 * dt,
            "tokens_per_s": rows * width / dt}


def rollout_part(config, shared: Shared, args) -> dict:
    from fmzoo.models.registry import build
    from fmzoo.train.rollout import rollout
    model, params = build(config), shared.state.params
    rs = np.random.RandomState(0)
    prompts = rs.randint(3, min(config.vocab_size, 256), (args.prompts, args.prompt_len)).tolist()

    def run(seed):
        return rollout(model, params, None, prompts, group_size=args.generations,
                       max_new_tokens=args.max_new_tokens, temperature=1.0, rng=seed,
                       max_length=args.prompt_len + args.max_new_tokens)
    first = run(0).seconds
    runs = [run(i + 1) for i in range(args.warmup + args.steps)][args.warmup:]
    seconds = float(np.mean([r.seconds for r in runs]))
    generated = float(np.mean([r.completion_lengths.sum() for r in runs]))
    N = args.prompts * args.generations
    return {"rows": N, "prompts": args.prompts, "generations": args.generations,
            "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
            "compile_s": first, "seconds": seconds, "generated_tokens": generated,
            "ms_per_decode_step": 1e3 * seconds / args.max_new_tokens,
            "tokens_per_s": generated / seconds}


def bench_config(args):
    from fmzoo.models import get_config
    need = max(args.seq_len, args.prompt_len + args.max_new_tokens)
    over = dict(args.override, dtype=args.dtype, attention_impl=args.attention)
    if get_config(args.preset).max_len < need:
        over["max_len"] = need
    return get_config(args.preset, **over)


def measure(part: str, shared: Shared, args) -> dict:
    import jax

    from fmzoo.models.attention import choose_impl
    config = shared.config
    row = {"bench": "posttrain", "part": part, "preset": args.preset, "dtype": args.dtype,
           "attention": choose_impl(config.attention_impl, config.compute_dtype,
                                    config.dim_per_head),
           "device": jax.devices()[0].device_kind}
    run = (lambda c: rollout_part(c, shared, args)) if part == "rollout" else \
        (lambda c: step_part(part, c, shared, args))
    try:
        row.update(run(config))
    except Exception as e:  # noqa: BLE001 -- one GPU call must not lose a part to a kernel
        if row["attention"] in ("xla", "reference"):
            raise
        note = f"{row['attention']} failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        print(f"  [{part}] {note}; retrying with xla", file=sys.stderr, flush=True)
        row.update(run(config.replace(attention_impl="xla")), attention="xla",
                   attention_note=note)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| part | rows x tokens | ms per step / rollout | tokens/s | compile s | attention |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "rollout":
            shape = (f"{r['prompts']} x {r['generations']} x ({r['prompt_len']} + "
                     f"{r['max_new_tokens']} new)")
            ms = f"{1e3 * r['seconds']:.1f} ({r['ms_per_decode_step']:.2f}/token step)"
            unit = "generated"
        else:
            shape, ms, unit = f"{r['rows']} x {r['seq_len']}", f"{r['ms_per_step']:.1f}", ""
        lines.append(f"| {r['part']} | {shape} | {ms} | {r['tokens_per_s']:,.0f} {unit} | "
                     f"{r['compile_s']:.1f} | {r['attention']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    if (error := device_mismatch(args.device)):
        print(error, file=sys.stderr)
        return 2
    rows, shared = [], Shared(bench_config(args))
    for part in args.parts:
        rows.append(measure(part, shared, args))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
        print(f"  [{part}] {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr,
              flush=True)
    print(f"\nPost-training speed, {args.preset}, compute {args.dtype}, params fp32; jax "
          f"{jax.__version__} on {rows[0]['device']}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
