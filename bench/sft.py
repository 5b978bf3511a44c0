"""SFT step cost beside the pretraining step for the same model, batch and optimizer, and full
finetuning vs LoRA (step time, optimizer-state bytes). Same run, same machine: compare ratios.

    python bench/sft.py                          # CPU: llama-tiny, batch 16 x 128
    python bench/sft.py --preset gpt2-124m --batch 8 --seq-len 512 --json

Rows: pretrain (every token labelled), sft (completion-only mask: ~half the targets), sft
packed (segment ids + restarting positions), sft + LoRA rank 8. Masking and packing change
only which targets count and the attention mask, so their step should cost what pretraining
costs; LoRA trades a smaller optimizer state for the per-step merge of the adapters.
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


def batch(B: int, T: int, packed: bool, completion: bool, seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    x = rs.randint(0, 256, (B, T + 1)).astype(np.int32)
    if packed:  # four examples per row
        seg = (np.arange(T) // (T // 4) + 1)[None].repeat(B, 0).astype(np.int32)
        pos = (np.arange(T) % (T // 4))[None].repeat(B, 0).astype(np.int32)
    else:
        seg = np.ones((B, T), np.int32)
        pos = np.arange(T)[None].repeat(B, 0).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    if completion:  # the first half of each example is prompt
        mask = (pos >= (T // 8 if packed else T // 2)).astype(np.float32)
    return dict(inputs=x[:, :-1], targets=x[:, 1:], loss_mask=mask, positions=pos,
                segment_ids=seg)


def opt_bytes(state) -> int:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = p.parse_args(argv)

    import jax

    from fmzoo.models import get_config
    from fmzoo.models.lora import LoraSpec
    from fmzoo.models.registry import build
    from fmzoo.train.losses import lm_loss
    from fmzoo.train.mesh import make_mesh, put_batch
    from fmzoo.train.optim import make_optimizer
    from fmzoo.train.sft import sft_loss
    from fmzoo.train.state import lora_loss, lora_optimizer, sharded_init
    from fmzoo.train.step import make_train_step

    config = get_config(args.preset, max_len=max(args.seq_len, 8))
    model = build(config)
    mesh = make_mesh("data=1", jax.devices()[:1])
    spec = LoraSpec(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    B, T = args.batch, args.seq_len
    cases = [("pretrain", lm_loss(model, config), None, batch(B, T, True, False)),
             ("sft", sft_loss(model, config), None, batch(B, T, False, True)),
             ("sft packed", sft_loss(model, config), None, batch(B, T, True, True)),
             (f"sft lora r={spec.rank}", lora_loss(sft_loss(model, config), spec), spec,
              batch(B, T, False, True))]
    rows = []
    for name, loss, lora, b in cases:
        tx = make_optimizer(1e-3, 1000, warmup_steps=10)
        tx = lora_optimizer(tx) if lora else tx
        state, shardings = sharded_init(config, tx, mesh, lora=lora)
        step = make_train_step(loss, tx, mesh, shardings)
        b = put_batch(b, mesh)
        seconds, state = time_steps(step, state, b, warmup=2, steps=args.steps)
        tokens = B * T
        rows.append({"bench": "sft", "case": name, "preset": args.preset, "batch": B,
                     "seq_len": T, "ms_per_step": 1e3 * seconds,
                     "tokens_per_s": tokens / seconds, "optimizer_state_bytes": opt_bytes(state),
                     "device": jax.devices()[0].device_kind})
    base = rows[0]["ms_per_step"]
    lines = ["| case | ms/step | tokens/s | vs pretrain | optimizer state |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step'] / base:.2f}x | "
                     f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB |")
        if args.json:
            print(json.dumps(r))
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        with open(RESULTS, "a") as f:
            f.write(f"\n### SFT step vs pretraining, {args.preset}, batch {B} x {T} "
                    f"({datetime.date.today()}, {rows[0]['device']}, "
                    f"{len(os.sched_getaffinity(0))} cores)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
