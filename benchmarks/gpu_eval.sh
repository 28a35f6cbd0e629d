#!/usr/bin/env bash
# EVAL.md's experiment on one GPU: two `small` models with the same token budget, one trained
# in `full` mode and one in `segmented` mode (K = 1), then each evaluated in all three modes.
#   bash benchmarks/gpu_eval.sh train [seconds]   # both trainings at once; SIGTERM at the limit saves
#   bash benchmarks/gpu_eval.sh eval [seconds]    # the latest step both runs reached, every mode
# Environment: TAG names the runs (runs/eval${TAG}_{full,segmented}); TRAIN_ARGS adds config
# override (one argument) to both trainings; EVAL_ARGS replaces the evaluation's task/length arguments.
# Outputs: the run directories and, in $OUT, the logs, metrics and a tarball of the evaluation.
set -u
OUT=${OUT:-runs/eval_out}
TAG=${TAG:-}
mkdir -p "$OUT"
MODELS="full segmented"
EVAL_ARGS=${EVAL_ARGS:---lengths 2048 8192 16384 --samples 3 --depths 0 0.5 1 --ppl-lengths 2048 16384 --ppl-samples 4}
case "${1:-}" in
  train)
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
    for m in $MODELS; do
      timeout -s TERM "${2:-420}" python3 train.py --config small attention.mode=$m run.dir=runs/eval${TAG}_$m \
        checkpoint.every=100 checkpoint.keep=30 ${TRAIN_ARGS:+"$TRAIN_ARGS"} >"$OUT/train${TAG}_$m.log" 2>&1 &
    done
    wait
    for m in $MODELS; do cp runs/eval${TAG}_$m/metrics.jsonl "$OUT/metrics${TAG}_$m.jsonl"; done
    ;;
  eval)
    # the same number of training tokens for both: the largest checkpoint step present in both runs
    STEP=$(comm -12 <(ls runs/eval${TAG}_full/checkpoints | sort) <(ls runs/eval${TAG}_segmented/checkpoints | sort) | sort -n | tail -1)
    [ -n "$STEP" ] || { echo "no checkpoint step common to both runs" >&2; exit 1; }
    echo "evaluating step $STEP" | tee "$OUT/eval${TAG}_step.txt"
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
    for m in $MODELS; do
      timeout "${2:-400}" python3 -m segexec_jax.eval --checkpoint runs/eval${TAG}_$m/checkpoints/$STEP \
        --out runs/eval${TAG}_$m/eval $EVAL_ARGS --batch 6 >"$OUT/eval${TAG}_$m.log" 2>&1 &
    done
    wait
    tar czf "$OUT/eval${TAG}.tgz" runs/eval${TAG}_*/eval
    ;;
  *) echo "usage: $0 train [seconds] | eval [seconds]" >&2; exit 2 ;;
esac
