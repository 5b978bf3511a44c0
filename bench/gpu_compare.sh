#!/usr/bin/env bash
# Before/after on the lent GPU, in one call: bench/prefill_decode.py on the current tree and
# on an older checkout placed at $OLD (e.g. `git archive <rev> | tar -x -C .bench_old`),
# alternating, each under its own time limit. Results: $OUT/compare.jsonl and the logs.
#   DRY=1 OLD=.bench_old bash bench/gpu_compare.sh     rehearsal on the CPU at toy sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fmzoo-gpu}; OLD=${OLD:-.bench_old}; DRY=${DRY:-0}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } > "$OUT/gpu.txt"
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
shim() {  # a package dir mapping fmzoo.{models,infer,train} onto a checkout's folders
  local src=$1 dst; dst=$(mktemp -d)
  mkdir -p "$dst/fmzoo" && cp "$src"/fmzoo/*.py "$dst/fmzoo/"
  for d in models infer train; do ln -s "$(cd "$src" && pwd)/$d" "$dst/fmzoo/$d"; done
  echo "$dst"
}
NEW_PATH=$(shim .); OLD_PATH=$(shim "$OLD")
if [ "$DRY" = 1 ]; then
  export FMZOO_BENCH_DRY=1 JAX_PLATFORMS=cpu
  ARGS="--presets gpt-tiny llama-tiny --prompt 64 --contexts 32 --new 4 --reps 1"; T=120
else
  ARGS="--device gpu --dtype bfloat16 --prompt 512 --contexts ${CONTEXTS:-64 1024} --new 32 --reps 3"
  T=${T:-120}
fi
for preset in ${PRESETS:-gpt2-124m llama-3.2-1b}; do
  [ "$DRY" = 1 ] && P="" || P="--presets $preset"
  for label in new old; do
    [ $label = new ] && path=$NEW_PATH || path=$OLD_PATH
    echo "== $label $preset" | tee -a "$OUT/compare.log"
    # run from $OUT so that an installed fmzoo cannot shadow the shim
    (cd "$OUT" && PYTHONPATH="$path" timeout $T python "$OLDPWD/bench/prefill_decode.py" $ARGS $P \
       --label $label --json) 2>&1 | tee -a "$OUT/compare.log"
  done
  [ "$DRY" = 1 ] && break
done
grep -h '^{' "$OUT/compare.log" > "$OUT/compare.jsonl" 2>/dev/null || true
echo "== done"
