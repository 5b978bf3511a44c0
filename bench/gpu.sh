#!/usr/bin/env bash
# The one prepared GPU run (an H100 lent through the device tool; <= 8 minutes in all), in
# order of importance, each part under its own time limit so one slow part cannot eat the rest:
#   train:     gpt2-124m shape, bf16, seq 1024, cuDNN attention, largest batch -> tokens/s, MFU
#   decode:    gpt2-124m and llama-3.2-1b shapes, bf16, batch 1 -> ms/token, bandwidth use
#   train:     llama-3.2-1b shape, bf16, seq 1024, remat full -> tokens/s, MFU
#   attention: cuDNN vs XLA causal attention at T = 1024 and 4096 -> TFLOP/s
# The GPU image has jax/flax/optax/orbax but no tensorflow-datasets/grain and no network:
# fmzoo is installed without dependencies (nothing here imports those at top level); if that
# install fails, a shim package directory maps fmzoo.{models,infer,train} onto the folders.
# Everything lands in $OUT (logs, *.jsonl, gpu.txt); copy the tables into bench/RESULTS.md.
#   DRY=1 bash bench/gpu.sh    runs the same steps on the CPU at toy sizes (a rehearsal).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fmzoo-gpu}
mkdir -p "$OUT"
DRY=${DRY:-0}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } > "$OUT/gpu.txt"
python -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# (2026-11-26: `pip install --no-deps --no-build-isolation -e .` on the H100 image installed
# but left fmzoo.models unimportable, so the shim is the first choice there.)
if ! python -c "import fmzoo.models, fmzoo.infer, fmzoo.train" 2>"$OUT/install.log"; then
  SHIM=$(mktemp -d)
  mkdir -p "$SHIM/fmzoo" && cp fmzoo/*.py "$SHIM/fmzoo/"
  for d in models infer train; do ln -s "$PWD/$d" "$SHIM/fmzoo/$d"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "fmzoo via shim $SHIM" >> "$OUT/install.log"
fi
python -c "import fmzoo.models, fmzoo.infer, fmzoo.train; print('fmzoo imports')" 2>&1 | tail -3

if [ "$DRY" = 1 ]; then
  export FMZOO_BENCH_DRY=1 JAX_PLATFORMS=cpu   # the GPU code path, run on the CPU
  DEV=gpu; G124=gpt-tiny; L1B=llama-tiny; SEQ=64; BS="8 4"; LBS="4 2"; LENS="64 128"
  DTYPE=float32; ATTN=xla; AIMPL="--impls xla reference"; DPRESETS="gpt-tiny llama-tiny"; T1=120; T2=120; T3=120; T4=60
  EXTRA="--steps 2"
else
  DEV=gpu; G124=gpt2-124m; L1B=llama-3.2-1b; SEQ=1024; BS="24 16 8"; LBS="16 8 4"
  LENS="1024 4096"; DTYPE=bfloat16; ATTN=cudnn; DPRESETS="gpt2-124m llama-3.2-1b"
  T1=150; T2=170; T3=100; T4=50; EXTRA="--steps 10"; AIMPL=""
fi

echo "== train $G124" | tee "$OUT/train_gpt2.log"
timeout $T1 python bench/train.py --device $DEV --preset $G124 --dtype $DTYPE --seq-len $SEQ \
  --attention $ATTN --no-packed --batch-sizes $BS --json --no-write $EXTRA 2>&1 \
  | tee -a "$OUT/train_gpt2.log"
echo "== decode $DPRESETS" | tee "$OUT/decode.log"
timeout $T2 python bench/decode.py --device $DEV --dtype $DTYPE --presets $DPRESETS \
  --batch 1 --long 128 --naive-steps 2 --results "$OUT/RESULTS.decode.md" 2>&1 | tee -a "$OUT/decode.log"
echo "== train $L1B remat" | tee "$OUT/train_llama.log"
timeout $T3 python bench/train.py --device $DEV --preset $L1B --dtype $DTYPE --seq-len $SEQ \
  --attention $ATTN --no-packed --remat full --batch-sizes $LBS --json --no-write $EXTRA 2>&1 \
  | tee -a "$OUT/train_llama.log"
echo "== attention" | tee "$OUT/attention.log"
timeout $T4 python bench/attention.py --device $DEV --dtype $DTYPE --lengths $LENS --reps 5 $AIMPL 2>&1 \
  | tee -a "$OUT/attention.log"
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl" 2>/dev/null || true
echo "== done"
