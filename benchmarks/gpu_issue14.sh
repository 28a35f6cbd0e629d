#!/usr/bin/env bash
# Issue 14's H200 measurements, two lanes on two GPUs (nvidia-h200-x2), one fresh process per
# configuration; everything lands in $OUT (bench JSON lines in $OUT/*.jsonl, logs in $OUT/*.log).
#   bash benchmarks/gpu_issue14.sh kernels   # decode kernels: GPU tests, decode 128K xla vs pallas, prefill int8, step profile
#   bash benchmarks/gpu_issue14.sh packed    # packed rows on the fused path: GPU tests, train tokens/s
#   bash benchmarks/gpu_issue14.sh final     # all GPU tests; packed rows; decode kernels; prefill int8; the step
#   bash benchmarks/gpu_issue14.sh one       # on one GPU, in order of need: GPU tests, packed rows (segmented),
#                                            # decode kernels (segmented, full), prefill int8, the step
set -u
OUT=${OUT:-runs/issue14}
mkdir -p "$OUT"
BF16=model.param_dtype=bfloat16
step() {  # log name, seconds, command...
  local log=$1 limit=$2; shift 2
  echo "== $* (limit ${limit}s) $(date +%T)" >>"$OUT/$log.log"
  timeout -k 5 "$limit" "$@" >>"$OUT/$log.log" 2>&1 || echo "   exit $?" >>"$OUT/$log.log"
}
lane0() {
  export CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
  case $1 in
    kernels)
      OUT=$OUT/step BUDGET=230 bash benchmarks/step_profile.sh >/dev/null 2>&1
      for T in 81920 131072; do
        step lane0 110 python3 -m segexec_jax.bench prefill --config llama2_7b --mode segmented --seq-len $T --repeats 2 --warmup 1 --out "$OUT/prefill.jsonl" $BF16 inference.kv_dtype=int8
      done
      step lane0 100 python3 -m segexec_jax.bench decode --config llama2_7b --mode segmented --context 131072 --batch 27 --steps 16 --warmup 3 --out "$OUT/decode.jsonl" $BF16 inference.decode_kernel=pallas inference.kv_dtype=int8
      ;;
    packed|final)
      for M in segmented full; do for D in "" "--data"; do
        step lane0 110 python3 -m segexec_jax.bench train --config 1b --mode $M --seq-len 8192 --batch 8 --steps 3 --warmup 1 $D --out "$OUT/train.jsonl" train.grad_accum=8
      done; done
      ;;&
    final)
      step lane0 60 python3 -m segexec_jax.bench train --config 1b --mode full --seq-len 8192 --batch 1 --steps 5 --warmup 2 --out "$OUT/train.jsonl"
      step lane0 60 python3 benchmarks/plain_step.py --seq-len 8192 --batch 1 --steps 5 --warmup 2 --remat layer --out "$OUT/train.jsonl"
      ;;
  esac
}
lane1() {
  export CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
  case $1 in
    kernels)
      step lane1 150 python3 -m pytest -q -n 0 -m gpu -p no:cacheprovider tests/test_decode_kernels.py
      for K in xla pallas; do
        step lane1 70 python3 -m segexec_jax.bench decode --config llama2_7b --mode full --context 131072 --batch 1 --steps 16 --warmup 3 --out "$OUT/decode.jsonl" $BF16 inference.decode_kernel=$K
        step lane1 100 python3 -m segexec_jax.bench decode --config llama2_7b --mode segmented --context 131072 --batch 27 --steps 16 --warmup 3 --out "$OUT/decode.jsonl" $BF16 inference.decode_kernel=$K
      done
      ;;
    packed)
      step lane1 200 python3 -m pytest -q -n 0 -m gpu -p no:cacheprovider tests/test_packed_attention.py
      ;;
    final)
      step lane1 240 python3 -m pytest -q -n 0 -m gpu -p no:cacheprovider tests/test_decode_kernels.py tests/test_packed_attention.py tests/test_attention.py
      step lane1 80 python3 benchmarks/decode_kernel_bench.py
      for M in full segmented; do B=$([ $M = full ] && echo 1 || echo 27)
        step lane1 90 python3 -m segexec_jax.bench decode --config llama2_7b --mode $M --context 131072 --batch $B --steps 16 --warmup 3 --out "$OUT/decode.jsonl" $BF16 inference.decode_kernel=pallas
      done
      for KV in null int8; do
        step lane1 100 python3 -m segexec_jax.bench prefill --config llama2_7b --mode segmented --seq-len 81920 --repeats 2 --warmup 1 --out "$OUT/prefill.jsonl" $BF16 inference.kv_dtype=$KV
      done
      ;;
  esac
}
if [ "${1:-}" = one ]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
  step one 200 python3 -m pytest -q -n 0 -m gpu -p no:cacheprovider tests/test_decode_kernels.py tests/test_packed_attention.py tests/test_attention.py
  for D in "" "--data"; do
    step one 110 python3 -m segexec_jax.bench train --config 1b --mode segmented --seq-len 8192 --batch 8 --steps 3 --warmup 1 $D --out "$OUT/train.jsonl" train.grad_accum=8
  done
  step one 90 python3 -m segexec_jax.bench decode --config llama2_7b --mode segmented --context 131072 --batch 27 --steps 16 --warmup 3 --out "$OUT/decode.jsonl" $BF16 inference.decode_kernel=pallas
  step one 80 python3 -m segexec_jax.bench prefill --config llama2_7b --mode segmented --seq-len 81920 --repeats 2 --warmup 1 --out "$OUT/prefill.jsonl" $BF16 inference.kv_dtype=int8
  step one 60 python3 -m segexec_jax.bench decode --config llama2_7b --mode full --context 131072 --batch 1 --steps 16 --warmup 3 --out "$OUT/decode.jsonl" $BF16 inference.decode_kernel=pallas
  step one 60 python3 -m segexec_jax.bench train --config 1b --mode full --seq-len 8192 --batch 1 --steps 5 --warmup 2 --out "$OUT/train.jsonl"
  exit 0
fi
lane0 "${1:-kernels}" &
lane1 "${1:-kernels}" &
wait
