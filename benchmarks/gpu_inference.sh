#!/usr/bin/env bash
# Issue 4's measurements on one GPU, one fresh process per configuration:
#   bash benchmarks/gpu_inference.sh prefill   # LLaMA-2-7B shape at 32K/80K/128K, ~1B shape at 1M
#   bash benchmarks/gpu_inference.sh decode    # LLaMA-2-7B shape, largest batch per mode at 32K/128K
# Results are appended as JSON lines to $OUT/inference.jsonl, progress to $OUT/bench.log.
set -u
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
BF16=model.param_dtype=bfloat16
bench() {  # seconds, then bench arguments
  local limit=$1; shift
  echo "== $* (limit ${limit}s) $(date +%T)" >>"$OUT/bench.log"
  timeout "$limit" python3 -m segexec_jax.bench "$@" >>"$OUT/bench.log" 2>&1 || echo "   exit $?" >>"$OUT/bench.log"
}
R="--out $OUT/inference.jsonl"
case "${1:-all}" in
  prefill|all)
    for T in 131072 81920 32768; do
      for mode in segmented full; do
        bench $((60 + T / 1024)) prefill --config llama2_7b --mode $mode --seq-len $T --repeats 2 --warmup 1 $R $BF16
      done
    done
    bench 200 prefill --config 1b --mode segmented --seq-len 1048576 --repeats 1 --warmup 1 $R $BF16
    ;;&
  decode|all)
    bench 120 decode --config llama2_7b --mode full --context 131072 --max-batch --start-batch 1 $R $BF16
    bench 150 decode --config llama2_7b --mode segmented --context 131072 --max-batch --start-batch 34 $R $BF16
    bench 150 decode --config llama2_7b --mode full --context 32768 --max-batch --start-batch 7 $R $BF16
    bench 150 decode --config llama2_7b --mode segmented --context 32768 --max-batch --start-batch 44 $R $BF16
    bench 150 decode --config llama2_7b --mode streaming --context 32768 --max-batch --start-batch 56 $R $BF16
    # the streaming cache does not depend on the context: 128K runs at the batch found at 32K
    B=$(python3 -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1])][-1]['batch'])" "$OUT/inference.jsonl")
    bench 90 decode --config llama2_7b --mode streaming --context 131072 --batch "$B" $R $BF16
    ;;
esac
