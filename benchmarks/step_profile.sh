#!/usr/bin/env bash
# Where the 1b training step's time goes, ours against a plain JAX step (issue 14, item 4).
#
#   OUT=/path/to/results bash benchmarks/step_profile.sh
#
# On one GPU, each in a fresh process with a timeout, all within BUDGET seconds (default 235):
#   bench: ours full, plain (remat layer), ours segmented (K=1), plain (remat none)
#          -> $OUT/step.jsonl, one JSON line each (8K tokens, batch 1, 5 timed steps after 2)
#   profile: one traced step of plain (remat layer) and of ours full, with their optimized HLO
#          -> $OUT/profile_plain.txt, $OUT/profile_ours.txt (time by kernel, category, JAX op)
#             $OUT/hlo_plain.txt.gz, $OUT/hlo_ours.txt.gz, $OUT/hlo_stats.txt (matmul dtypes,
#             converts, copies of both compiled steps)
#   $OUT/log.txt: every command, its output and exit status. A step that fails or times out is
#   logged and the script goes on; what is left of the budget decides whether later steps run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/step_profile}
BUDGET=${BUDGET:-235}
SEQ=${SEQ:-8192}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
TRACES=$(mktemp -d /tmp/step_traces.XXXX)
START=$SECONDS
PY=${PYTHON:-python}
# for a dry run on a CPU: OURS_OVERRIDES="model.n_layers=2 segment.long_layers=[1]" PLAIN_ARGS="--n-layers 2"
read -r -a OURS <<<"${OURS_OVERRIDES:-}"
read -r -a PLAIN <<<"${PLAIN_ARGS:-}"

run() {  # run NAME LIMIT_S CMD...: logged, bounded by LIMIT_S and by what is left of BUDGET
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 15)); then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, at $((SECONDS - START))s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  return 0
}

echo "step_profile: $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" >"$LOG"
COMMON=(--seq-len "$SEQ" --batch 1 --steps 5 --warmup 2)

run ours_full 60 $PY -m segexec_jax.bench train --config 1b --mode full "${COMMON[@]}" --out "$OUT/step.jsonl" ${OURS[@]+"${OURS[@]}"}
run plain_layer 50 $PY benchmarks/plain_step.py "${COMMON[@]}" --remat layer --out "$OUT/step.jsonl" ${PLAIN[@]+"${PLAIN[@]}"}
run ours_segmented 75 $PY -m segexec_jax.bench train --config 1b --mode segmented "${COMMON[@]}" --out "$OUT/step.jsonl" ${OURS[@]+"${OURS[@]}"}
run profile_plain 70 $PY benchmarks/plain_step.py --seq-len "$SEQ" --batch 1 --steps 2 --warmup 1 --remat layer \
  --profile "$TRACES/plain" --hlo "$OUT/hlo_plain.txt.gz" ${PLAIN[@]+"${PLAIN[@]}"}
run profile_ours 80 $PY benchmarks/step_hlo.py ours --mode full --seq-len "$SEQ" --batch 1 --steps 2 --warmup 1 \
  --profile "$TRACES/ours" --hlo "$OUT/hlo_ours.txt.gz" ${OURS[@]+"${OURS[@]}"}
run plain_none 50 $PY benchmarks/plain_step.py "${COMMON[@]}" --remat none --out "$OUT/step.jsonl" ${PLAIN[@]+"${PLAIN[@]}"}

# the summaries need no GPU: bounded, but they run even when the budget is spent
timeout 60 $PY benchmarks/trace_summary.py "$TRACES/plain" --hlo "$OUT/hlo_plain.txt.gz" --out "$OUT/profile_plain.txt" >/dev/null 2>>"$LOG"
timeout 60 $PY benchmarks/trace_summary.py "$TRACES/ours" --hlo "$OUT/hlo_ours.txt.gz" --out "$OUT/profile_ours.txt" >/dev/null 2>>"$LOG"
hlos=()
for f in "$OUT/hlo_plain.txt.gz" "$OUT/hlo_ours.txt.gz"; do [[ -s $f ]] && hlos+=("$f"); done
((${#hlos[@]})) && timeout 60 $PY benchmarks/step_hlo.py stats "${hlos[@]}" >"$OUT/hlo_stats.txt" 2>>"$LOG"
rm -rf "$TRACES"
echo "step_profile: done in $((SECONDS - START))s" | tee -a "$LOG"
[[ -f $OUT/step.jsonl ]] && cat "$OUT/step.jsonl"
exit 0
