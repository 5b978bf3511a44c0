#!/usr/bin/env bash
# The one prepared GPU run (an H100 lent through the device tool; <= 8 minutes in all):
#   decode: gpt2-124m and llama-3.2-1b shapes, bf16, batch 1 -> ms/token, bandwidth use
#   train:  gpt2-124m shape, bf16, seq 1024, cuDNN attention, largest batch -> tokens/s, MFU
# The GPU image has jax/flax/optax/orbax but no tensorflow-datasets/grain and no network:
# fmzoo is installed without dependencies (nothing here imports those at top level).
# Results land in $OUT (RESULTS.md section + logs); copy them into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fmzoo-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || true
cp bench/RESULTS.md "$OUT/RESULTS.before.md"
timeout 230 python bench/decode.py --device gpu --dtype bfloat16 --presets gpt2-124m llama-3.2-1b \
  --batch 1 --results "$OUT/RESULTS.decode.md" 2>&1 | tee "$OUT/decode.log"
timeout 230 python bench/train.py --device gpu --preset gpt2-124m --dtype bfloat16 --seq-len 1024 \
  --attention cudnn 2>&1 | tee "$OUT/train.log"
cp bench/RESULTS.md "$OUT/RESULTS.after.md"
