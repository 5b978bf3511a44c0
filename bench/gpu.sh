#!/usr/bin/env bash
# The one prepared GPU run (a card lent through the device tool; ONE call, under 8 minutes),
# in order of importance, each part under its own time limit, cut further so that the whole
# run ends within $BUDGET seconds (default 450) whatever the parts do:
#   train_gpt2      gpt2-124m shape, bf16, seq 1024, cuDNN attention, largest batch -> tok/s, MFU
#   decode_gpt2     gpt2-124m, bf16, batch 1 -> ms/token, fraction of the card's bandwidth
#   decode_llama    llama-3.2-1b shape, same (bench/decode.py); when it prints nothing in its
#                   limit, decode_llama_short (bench/prefill_decode.py, contexts 64 and 1024)
#   train_llama     llama-3.2-1b shape, bf16, seq 1024, remat full -> tokens/s, MFU
#   posttrain       gpt2-124m, bf16: SFT, DPO, GRPO step tokens/s and rollout tokens/s
#   attention       cuDNN vs XLA causal attention at T = 1024 and 4096 -> TFLOP/s
# MFU: model FLOPs 6N + 12*L*d*T per token (bench/train.py) against 989 TFLOP/s dense bf16
# (H100 SXM and H200 alike). Bandwidth peaks are the datasheets' (NVIDIA H100 and H200
# product pages): H100 SXM 3.35e12 B/s, H100 NVL 3.9e12, H100 PCIe 2.0e12, H200 4.8e12,
# A100 80GB 2.039e12, A100 40GB 1.555e12, chosen by nvidia-smi's card name (PEAK_BW=...
# overrides; an unknown card falls back to 3.35e12 and says so).
# The GPU image has jax/flax/optax/orbax but no tensorflow-datasets/grain and no network:
# if fmzoo is not importable, a shim package directory maps fmzoo.{models,infer,train} onto
# the folders. Compiled programs are cached in /tmp/fmzoo-jax-cache, so a rerun on the same
# warm machine skips most compiling.
# Everything lands in $OUT: gpu.txt (card, driver, versions, date), <part>.log,
# parts.jsonl (each part's exit code, seconds, limit), results.jsonl (every JSON measurement,
# its part in "section"), RESULTS.decode.md. Copy the numbers into bench/RESULTS.md.
#   DRY=1 bash bench/gpu.sh    the same parts on the CPU at toy sizes (a rehearsal)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fmzoo-gpu}
mkdir -p "$OUT"
: > "$OUT/parts.jsonl"
DRY=${DRY:-0}
START=$SECONDS
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/fmzoo-jax-cache}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  date -u +"date %Y-%m-%dT%H:%M:%SZ"; } > "$OUT/gpu.txt"
python -c "import sys, jax, jaxlib, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$CARD" in
  *H200*)                    BW=4.8e12 ;;
  *H100*NVL*)                BW=3.9e12 ;;
  *H100*PCIe*)               BW=2.0e12 ;;
  *H100*)                    BW=3.35e12 ;;
  *A100*80GB*)               BW=2.039e12 ;;
  *A100*)                    BW=1.555e12 ;;
  *)                         BW=3.35e12
                             echo "unknown card '$CARD': 3.35e12 B/s assumed" >> "$OUT/gpu.txt" ;;
esac
BW=${PEAK_BW:-$BW}
echo "peak bandwidth used: $BW B/s (card '${CARD:-none}')" >> "$OUT/gpu.txt"
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
  BUDGET=${BUDGET:-2400}                       # a shared 2-core CPU compiles slowly
  G124=gpt-tiny; L1B=llama-tiny; SEQ=64; BS="8 4"; LBS="4 2"; DTYPE=float32; ATTN=xla
  TRAIN="--steps 2"; DEC="--long 16 --naive-steps 1 --new 16"
  SHORT="--prompt 64 --contexts 64 128 --new 8 --reps 1"
  POST="--preset gpt-tiny --batch 2 --seq-len 32 --pairs 1 --prompts 2 --generations 2
        --prompt-len 8 --max-new-tokens 8 --steps 1 --warmup 0"
  ATT="--lengths 64 128 --tokens 256 --reps 2 --impls xla reference"
  T_TG=400; T_DG=400; T_DL=400; T_DS=300; T_TL=400; T_PT=400; T_AT=200
else
  BUDGET=${BUDGET:-450}
  G124=gpt2-124m; L1B=llama-3.2-1b; SEQ=1024; BS="24 16"; LBS="16 8"; DTYPE=bfloat16
  ATTN=cudnn; TRAIN="--steps 10"; DEC="--long 64 --naive-steps 1"
  SHORT="--prompt 512 --contexts 64 1024 --new 32 --reps 3"
  POST="--preset gpt2-124m --batch 16 --seq-len 1024 --pairs 8 --prompts 8 --generations 8
        --prompt-len 128 --max-new-tokens 256 --steps 5 --warmup 1"
  ATT="--lengths 1024 4096 --reps 5"
  T_TG=120; T_DG=50; T_DL=90; T_DS=60; T_TL=80; T_PT=90; T_AT=40
fi

# part NAME LIMIT COMMAND...: runs COMMAND under min(LIMIT, what is left of BUDGET), output
# to $OUT/NAME.log; one status line to parts.jsonl. A part with < 10 s left is skipped.
part() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START))) t0=$SECONDS rc
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name skipped: ${left}s of the budget left" | tee "$OUT/$name.log"
    echo "{\"part\": \"$name\", \"rc\": null, \"skipped\": true}" >> "$OUT/parts.jsonl"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local late=false; { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && late=true
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit," \
       "\"timed_out\": $late}" | tee -a "$OUT/parts.jsonl"
}

part train_gpt2 $T_TG python bench/train.py --device gpu --preset $G124 --dtype $DTYPE \
  --seq-len $SEQ --attention $ATTN --no-packed --batch-sizes $BS --json --no-write $TRAIN
part decode_gpt2 $T_DG python bench/decode.py --device gpu --dtype $DTYPE --presets $G124 \
  --batch 1 $DEC --peak-bw $BW --json --results "$OUT/RESULTS.decode.md"
part decode_llama $T_DL python bench/decode.py --device gpu --dtype $DTYPE --presets $L1B \
  --batch 1 $DEC --peak-bw $BW --json --results "$OUT/RESULTS.decode.md"
if [ "$DRY" = 1 ] || ! grep -q '^{' "$OUT/decode_llama.log"; then  # the rehearsal runs both
  part decode_llama_short $T_DS python bench/prefill_decode.py --device gpu --presets $L1B \
    --dtype $DTYPE --batch 1 $SHORT --peak-bw $BW --label short --json
fi
part train_llama $T_TL python bench/train.py --device gpu --preset $L1B --dtype $DTYPE \
  --seq-len $SEQ --attention $ATTN --no-packed --remat full --batch-sizes $LBS --json \
  --no-write $TRAIN
part posttrain $T_PT python bench/posttrain_speed.py --device gpu --dtype $DTYPE $POST --json
part attention $T_AT python bench/attention.py --device gpu --dtype $DTYPE $ATT --json

# every JSON measurement, its part as "section" (lines that are not JSON are left out)
python - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
with open(os.path.join(out, "parts.jsonl")) as f:
    parts = [json.loads(line) for line in f if line.strip()]
rows = []
for p in parts:
    log = os.path.join(out, p["part"] + ".log")
    for line in open(log) if os.path.exists(log) else []:
        if line.startswith("{"):
            try:
                rows.append({"section": p["part"], **json.loads(line)})
            except json.JSONDecodeError:
                pass
with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
for p in parts:
    n = sum(r["section"] == p["part"] for r in rows)
    state = "skipped" if p.get("skipped") else "timed out" if p["timed_out"] else f"rc {p['rc']}"
    print(f"{p['part']:20s} {state:10s} {p.get('seconds', 0):4d} s  {n} measurement(s)")
EOF
echo "== done in $((SECONDS - START)) s"
