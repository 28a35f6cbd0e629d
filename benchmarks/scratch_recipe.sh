#!/usr/bin/env bash
# Issue 13's from-scratch runs (EVAL.md): configs/scratch_retrieval.yaml trained in several
# "lanes" on the same tokens, then each evaluated in every mode on passkey and single needle
# up to 8x the training length (20 samples a cell).
#   bash benchmarks/scratch_recipe.sh train [seconds]   # every lane at once, spread over the GPUs
#   bash benchmarks/scratch_recipe.sh eval [seconds]    # the latest step all lanes reached
# LANES names the runs (default "full segmented"); a lane is a mode, with `_sN` for seed N:
#   full       attention.mode=full
#   segmented  attention.mode=segmented (K = 1, the paper's retrieval rule)
#   refresh    segmented, retrieval refreshed every 32 tokens (segment.retrieval.refresh=32)
# e.g. LANES="refresh full_s1 segmented_s1". Lane i runs on GPU i mod (number of GPUs).
# ARGS adds config overrides to every training (e.g. ARGS="train.steps=3 train.batch_size=2" to
# try it on a CPU); EVAL_ARGS replaces the evaluation's sizes. Logs, metrics, results go to $OUT.
set -u
OUT=${OUT:-runs/scratch_out}
RUNS=${RUNS:-runs}
LANES=${LANES:-full segmented}
mkdir -p "$OUT"
EVAL_ARGS=${EVAL_ARGS:---tasks passkey niah_single --lengths 512 1024 2048 4096 --samples 4 --depths 0 0.25 0.5 0.75 1 --ppl-lengths 512 4096 --ppl-samples 4 --batch 20}
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU)
lane_args() {  # lane name -> config overrides
  local mode=${1%%_s*} seed=0
  [[ $1 == *_s* ]] && seed=${1##*_s}
  case $mode in
    full) echo "attention.mode=full train.seed=$seed" ;;
    segmented) echo "attention.mode=segmented train.seed=$seed" ;;
    refresh) echo "attention.mode=segmented segment.retrieval.refresh=32 train.seed=$seed" ;;
    *) echo "unknown lane '$1' (full, segmented or refresh, with _sN for seed N)" >&2; return 2 ;;
  esac
}
on_gpu() {  # lane index, command...
  if [ "$GPUS" -gt 0 ]; then export CUDA_VISIBLE_DEVICES=$(($1 % GPUS)); fi
  shift
  "$@"
}
for l in $LANES; do lane_args "$l" >/dev/null || exit 2; done
case "${1:-}" in
  train)
    i=0
    for l in $LANES; do
      on_gpu $i timeout -s TERM "${2:-420}" python3 train.py --config scratch_retrieval $(lane_args "$l") \
        run.dir="$RUNS/scratch_$l" ${ARGS:-} >"$OUT/train_$l.log" 2>&1 &
      i=$((i + 1))
    done
    wait
    for l in $LANES; do cp "$RUNS/scratch_$l/metrics.jsonl" "$OUT/metrics_$l.jsonl"; done
    ;;
  eval)
    common=""
    for l in $LANES; do
      steps=$(ls "$RUNS/scratch_$l/checkpoints" | sort)
      if [ -z "$common" ]; then common=$steps; else common=$(comm -12 <(echo "$common") <(echo "$steps")); fi
    done
    STEP=$(echo "$common" | sort -n | tail -1)
    [ -n "$STEP" ] || { echo "no checkpoint step common to all lanes ($LANES)" >&2; exit 1; }
    echo "evaluating step $STEP" | tee "$OUT/eval_step.txt"
    i=0
    for l in $LANES; do
      on_gpu $i timeout "${2:-400}" python3 -m segexec_jax.eval --checkpoint "$RUNS/scratch_$l/checkpoints/$STEP" \
        --out "$OUT/eval_$l" --overwrite $EVAL_ARGS >"$OUT/eval_$l.log" 2>&1 &
      i=$((i + 1))
    done
    wait
    ;;
  *) echo "usage: $0 train [seconds] | eval [seconds]" >&2; exit 2 ;;
esac
