#!/usr/bin/env bash
# Issue 13's from-scratch pair (EVAL.md): configs/scratch_retrieval.yaml trained in `full` and
# in `segmented` (K = 1) mode on the same tokens, one GPU each, then both evaluated in every
# mode on passkey and single needle up to 8x the training length (20 samples a cell).
#   bash benchmarks/scratch_recipe.sh train [seconds]   # both at once (GPU 0: full, GPU 1: segmented)
#   bash benchmarks/scratch_recipe.sh eval [seconds]    # the latest step both runs reached
# ARGS adds config overrides to both trainings (e.g. ARGS="train.steps=3 train.batch_size=2" to try it
# on a CPU); EVAL_ARGS replaces the evaluation's sizes. Logs, metrics and results go to $OUT.
set -u
OUT=${OUT:-runs/scratch_out}
RUNS=${RUNS:-runs}
mkdir -p "$OUT"
EVAL_ARGS=${EVAL_ARGS:---tasks passkey niah_single --lengths 512 1024 2048 4096 --samples 4 --depths 0 0.25 0.5 0.75 1 --ppl-lengths 512 4096 --ppl-samples 4 --batch 20}
lane() {  # GPU index, mode
  if command -v nvidia-smi >/dev/null; then export CUDA_VISIBLE_DEVICES=$1; fi
  shift
  "$@"
}
case "${1:-}" in
  train)
    i=0
    for m in full segmented; do
      lane $i timeout -s TERM "${2:-420}" python3 train.py --config scratch_retrieval attention.mode=$m \
        run.dir=$RUNS/scratch_$m ${ARGS:-} >"$OUT/train_$m.log" 2>&1 &
      i=$((i + 1))
    done
    wait
    for m in full segmented; do cp $RUNS/scratch_$m/metrics.jsonl "$OUT/metrics_$m.jsonl"; done
    ;;
  eval)
    STEP=$(comm -12 <(ls $RUNS/scratch_full/checkpoints | sort) <(ls $RUNS/scratch_segmented/checkpoints | sort) | sort -n | tail -1)
    [ -n "$STEP" ] || { echo "no checkpoint step common to both runs" >&2; exit 1; }
    echo "evaluating step $STEP" | tee "$OUT/eval_step.txt"
    i=0
    for m in full segmented; do
      lane $i timeout "${2:-400}" python3 -m segexec_jax.eval --checkpoint $RUNS/scratch_$m/checkpoints/$STEP \
        --out "$OUT/eval_$m" --overwrite $EVAL_ARGS >"$OUT/eval_$m.log" 2>&1 &
      i=$((i + 1))
    done
    wait
    ;;
  *) echo "usage: $0 train [seconds] | eval [seconds]" >&2; exit 2 ;;
esac
