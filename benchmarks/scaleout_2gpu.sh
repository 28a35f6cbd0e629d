#!/usr/bin/env bash
# Issue 11's 2-GPU measurements (one host), one fresh process per configuration:
#   bash benchmarks/scaleout_2gpu.sh one   # 1B at 8K and 32K, segmented K = 1 and full, on 1 GPU
#                                          # (two lanes: GPU 0 and GPU 1 at once)
#   bash benchmarks/scaleout_2gpu.sh two   # the same on 2 GPUs: data=2, fsdp=2, tensor=2, and
#                                          # fsdp=2 with one row (positions over fsdp)
#   bash benchmarks/scaleout_2gpu.sh 7b    # the paper's recipe, LLaMA-2-7B shape, 8 x 32K, fsdp=2
#                                          # (if it does not fit: again with mesh.fsdp_gather=layer)
# JSON lines go to $OUT/train.jsonl, progress and errors to $OUT/bench.log.
set -u
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
STEPS=${STEPS:-4}
bench() {  # seconds, then bench train arguments
  local limit=$1; shift
  echo "== $* (limit ${limit}s, GPUs ${CUDA_VISIBLE_DEVICES:-all}) $(date +%T)" >>"$OUT/bench.log"
  timeout "$limit" python3 -m segexec_jax.bench train --out "$OUT/train.jsonl" "$@" >>"$OUT/bench.log" 2>&1 \
    || echo "   exit $? ($*)" >>"$OUT/bench.log"
}
one_lane() {  # GPU, mode
  for T in 8192 32768; do
    CUDA_VISIBLE_DEVICES=$1 bench 180 --config 1b --mode "$2" --seq-len $T --batch 1 --steps $STEPS --warmup 1 mesh.data=1
  done
}
case "${1:-all}" in
  one|all)
    one_lane 0 segmented & one_lane 1 full & wait
    ;;&
  two|all)
    for T in 8192 32768; do
      for mode in segmented full; do
        common="--config 1b --mode $mode --seq-len $T --steps $STEPS --warmup 1"
        bench 180 $common --batch 2 mesh.data=2
        bench 180 $common --batch 2 mesh.data=1 mesh.fsdp=2
        bench 180 $common --batch 1 mesh.data=1 mesh.tensor=2
        [ $mode = segmented ] && bench 180 $common --batch 1 mesh.data=1 mesh.fsdp=2
      done
    done
    ;;&
  7b|all)
    R7="--config llama2_7b --seq-len 32768 --batch 8 --steps 2 --warmup 1 configs/llama2_7b_segexec.yaml"
    before=$(cat "$OUT/train.jsonl" 2>/dev/null | wc -l)
    bench 420 $R7 mesh.data=1 mesh.fsdp=2 train.grad_accum=4
    if [ "$(cat "$OUT/train.jsonl" 2>/dev/null | wc -l)" = "$before" ]; then  # no record: the smallest change
      bench 420 $R7 mesh.data=1 mesh.fsdp=2 train.grad_accum=4 mesh.fsdp_gather=layer
    fi
    ;;
esac
