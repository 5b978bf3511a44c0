"""DPO step cost beside the SFT step for the same model and the same rows, with the reference
computed in the step (a frozen input: one more forward) or precomputed (ref_logps in the
batch). Same run, same machine: compare ratios.

    python bench/dpo.py                          # CPU: llama-tiny, 8 pairs x 128
    python bench/dpo.py --preset gpt2-124m --pairs 8 --seq-len 512 --json

The DPO step runs chosen and rejected of B pairs as ONE forward + backward over 2B rows, so
its rows are the SFT step's 2B rows; the in-step reference adds a forward of those rows
(about a third of a forward + backward), the precomputed one adds nothing. Expected: DPO
with precomputed reference ~1x the SFT step, in-step reference ~1.3x, never 2x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import RESULTS, time_steps  # noqa: E402


def pref_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict:
    """B pairs of full rows: the first half of each row prompt, the rest response."""
    rs = np.random.RandomState(seed)
    tokens = rs.randint(3, min(vocab, 256), (B, 2, T)).astype(np.int32)
    resp = np.zeros((B, 2, T), np.float32)
    resp[..., T // 2:] = 1
    return dict(tokens=tokens, mask=np.ones((B, 2, T), np.int32), response_mask=resp)


def sft_batch(pref: dict) -> dict:
    """The same 2B rows as an SFT batch (completion-only labels on the responses)."""
    tokens = pref["tokens"].reshape(-1, pref["tokens"].shape[-1])
    N, T = tokens.shape
    nxt = np.concatenate([tokens[:, 1:], tokens[:, :1]], 1)
    labelled = np.pad(pref["response_mask"].reshape(N, T)[:, 1:], ((0, 0), (0, 1)))
    return dict(inputs=tokens, targets=nxt, loss_mask=labelled,
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (N, T)),
                segment_ids=np.ones((N, T), np.int32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the cases (best kept)")
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    import jax

    from fmzoo.models import get_config
    from fmzoo.models.registry import build
    from fmzoo.train.dpo_losses import dpo_step_loss, reference_logps
    from fmzoo.train.mesh import make_mesh, put_batch
    from fmzoo.train.optim import make_optimizer
    from fmzoo.train.sft import sft_loss
    from fmzoo.train.state import sharded_init
    from fmzoo.train.step import bind_frozen, make_train_step

    config = get_config(args.preset, max_len=max(args.seq_len, 8))
    model = build(config)
    mesh = make_mesh("data=1", jax.devices()[:1])
    B, T = args.pairs, args.seq_len
    pref = pref_batch(B, T, config.vocab_size)
    tx = make_optimizer(1e-4, 1000, warmup_steps=10)
    dpo = dpo_step_loss(model, config, beta=0.1)
    cases = {}
    for name in ("sft", "dpo, reference in the step", "dpo, reference precomputed"):
        state, shardings = sharded_init(config, tx, mesh)
        if name == "sft":
            step = make_train_step(sft_loss(model, config), tx, mesh, shardings)
            batch = sft_batch(pref)
        elif "in the step" in name:
            frozen = jax.tree.map(lambda x: x.copy(), state.params)
            step = bind_frozen(make_train_step(dpo, tx, mesh, shardings,
                                               frozen_shardings=shardings.params), frozen)
            batch = pref
        else:
            ref = jax.jit(lambda p, b: reference_logps(model, p, b))(state.params, pref)
            step = make_train_step(dpo, tx, mesh, shardings)
            batch = dict(pref, ref_logps=np.asarray(ref))
        cases[name] = [step, state, put_batch(batch, mesh), float("inf")]
    # rounds over the cases, best of each: a busy machine slows all cases alike
    for _ in range(args.rounds):
        for case in cases.values():
            seconds, case[1] = time_steps(case[0], case[1], case[2], warmup=1,
                                          steps=args.steps)
            case[3] = min(case[3], seconds)
    rows = [{"bench": "dpo", "case": name, "preset": args.preset, "pairs": B, "rows": 2 * B,
             "seq_len": T, "ms_per_step": 1e3 * c[3], "tokens_per_s": 2 * B * T / c[3],
             "device": jax.devices()[0].device_kind} for name, c in cases.items()]
    base = rows[0]["ms_per_step"]
    lines = ["| case | ms/step | tokens/s (2B rows x T) | vs sft step |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step'] / base:.2f}x |")
        if args.json:
            print(json.dumps(r))
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        with open(RESULTS, "a") as f:
            f.write(f"\n### DPO step vs SFT step, {args.preset}, {B} pairs (= {2 * B} rows) x "
                    f"{T} ({datetime.date.today()}, {rows[0]['device']}, "
                    f"{len(os.sched_getaffinity(0))} cores)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
