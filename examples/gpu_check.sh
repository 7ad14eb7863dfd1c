#!/usr/bin/env bash
# The one script a GPU machine runs (one H100/H200, at most 9 minutes: every part has its own time limit, so the
# limits below add up to 540 s), and what it found in OUT/summary.json:
#   1. facts        versions, device, compute capability, the CPU shim off        (megatron_ov3/perf/gpu_check.py)
#   2. pytest       tests/gpu + the host-sync count of a real step (OUT/host_syncs.json)
#   3. train        bf16, NCCL, ZeRO-1 through the DeepSpeed launcher: a straight run; the same run stopped half way
#                   (--exit-interval) and resumed -> OUT/resume.json (losses within 2%: GPU kernels are not
#                   bit-reproducible); then the export (OUT/hf)
#   4. fp8_compile  torchao FP8 + per-layer torch.compile for a few steps; graph breaks and recompiles logged
#   5. bench        one OV3-H step at micro batch 32: VAE decode vs eager, encoder vs bare compiled ViT, FP8 vs bf16
#                   (both compiled)
#
#   bash examples/gpu_check.sh OUT              # on the GPU machine
#   bash examples/gpu_check.sh OUT --dry-run    # the same parts at tiny size on the CPU (CI runs it); part 4 there
#                                                # validates its flags (pretrain --dry-run): compiling on a CPU takes
#                                                # minutes, and tests/e2e/test_training.py runs FP8 + compile for real
#
# No `set -e`: a failing part is recorded (rc, seconds) and the next one runs. OV3_PYTHON picks the interpreter.
OUT=${1:?usage: bash examples/gpu_check.sh OUT [--dry-run]}
DRY=${2:-}
PY=${OV3_PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" && rm -f "$OUT/parts.jsonl"
OUT=$(cd "$OUT" && pwd)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=$OUT/inductor_cache  # its own: a part killed by its time limit mid-compile can
                                                    # leave a truncated kernel that breaks later compiles
DS="$(dirname "$(command -v "$PY")")/deepspeed"
[[ -x "$DS" ]] || DS=deepspeed

if [[ "$DRY" == "--dry-run" ]]; then
  GPUS=1 SIZE=tiny IMG=32 MICRO=2 GLOBAL=4 ITERS=4 HALF=2 DRYFLAG=--dry-run SLOW=3  # a CPU gets 3x each limit
  BENCH=(--model-size tiny --image-size 32 --micro-batch-size 4 --tiny-vae --steps 1 --warmup 1 --no-naive --no-bare
         --no-breakdown --no-vae-decode)
  PYTEST=(tests/gpu)  # the host-sync count runs in the suite itself
elif [[ -n "$DRY" ]]; then
  echo "unknown option $DRY; use --dry-run or nothing" >&2; exit 2
else
  GPUS=1 SIZE=B IMG=64 MICRO=16 GLOBAL=32 ITERS=20 HALF=10 DRYFLAG= SLOW=1
  BENCH=(--model-size H --image-size 256 --micro-batch-size 32 --steps 5 --warmup 3 --no-naive --bare-compile)
  PYTEST=(tests/gpu tests/unit/test_host_syncs.py)
fi

part() {  # part NAME LIMIT_S CMD...: run with a time limit (the GPU's; x SLOW), log to OUT/NAME.log, record it
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout -k 10 $(( limit * SLOW )) "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '{"part": "%s", "rc": %d, "seconds": %d, "limit_s": %d, "applied_limit_s": %d}\n' "$name" "$rc" \
    "$(( $(date +%s) - start ))" "$limit" "$(( limit * SLOW ))" >> "$OUT/parts.jsonl"
  echo "$name: rc $rc in $(( $(date +%s) - start ))s (limit $(( limit * SLOW ))s), log $OUT/$name.log"
}

train() {  # train CKPT METRICS [flags]: the tiny recipe's mechanism at this check's size, bf16 on a GPU
  local ck=$1 metrics=$2
  shift 2
  DATA_PATH="$OUT/data/synthetic-{00000..00003}.tar" TOKENIZER="$OUT/data/tok.model" CHECKPOINT_PATH="$ck" \
    "$DS" --num_gpus "$GPUS" --master_port $(( 29500 + RANDOM % 2000 )) examples/pretrain_ov3_tiny.sh \
    --model-size "$SIZE" --image-size "$IMG" --micro-batch-size "$MICRO" --global-batch-size "$GLOBAL" \
    --transformer-impl local $([[ -z "$DRY" ]] && echo --bf16) --zero-stage 1 --log-interval 1 --num-workers 1 \
    --train-iters "$ITERS" --save-interval "$HALF" --load "$ck" --metrics-file "$metrics" "$@"
}

train_part() {  # data, straight run, stopped run, resumed run, comparison, export
  rm -rf "$OUT/data" "$OUT/straight" "$OUT/resumed" "$OUT/hf" "$OUT/fp8" "$OUT"/*.jsonl.tmp && mkdir -p "$OUT/data"
  rm -f "$OUT/straight.jsonl" "$OUT/resumed.jsonl" "$OUT/fp8.jsonl"
  "$PY" tools/make_synthetic_data.py --output-dir "$OUT/data" --num-samples 256 --samples-per-shard 64 \
    --image-size "$IMG" && \
  "$PY" tools/train_tokenizer.py --data-path "$OUT/data/synthetic-{00000..00003}.tar" \
    --output-prefix "$OUT/data/tok" --vocab-size 128 && \
  train "$OUT/straight" "$OUT/straight.jsonl" && \
  train "$OUT/resumed" "$OUT/resumed.jsonl" --exit-interval "$HALF" && \
  train "$OUT/resumed" "$OUT/resumed.jsonl" && \
  "$PY" -m megatron_ov3.perf.gpu_check compare "$OUT/straight.jsonl" "$OUT/resumed.jsonl" --after "$HALF" \
    --output "$OUT/resume.json" && \
  "$PY" tools/convert_to_hf.py --load "$OUT/resumed" --output "$OUT/hf" --no-progress
}

fp8_compile_part() {
  TORCH_LOGS="graph_breaks,recompiles" train "$OUT/fp8" "$OUT/fp8.jsonl" --fp8-format hybrid --torch-compile \
    --train-iters "$HALF" $DRYFLAG
}

export OUT DRY DRYFLAG PY DS GPUS SIZE IMG MICRO GLOBAL ITERS HALF
export -f train train_part fp8_compile_part  # `timeout` runs them in a child bash
part facts 30 "$PY" -m megatron_ov3.perf.gpu_check facts --output "$OUT/facts.json" $DRYFLAG
part pytest 90 env OV3_HOST_SYNCS_JSON="$OUT/host_syncs.json" "$PY" -m pytest -q -rs -p no:cacheprovider \
  "${PYTEST[@]}"
part train 210 bash -c train_part
part fp8_compile 90 bash -c fp8_compile_part
part bench 120 "$PY" tools/benchmark.py "${BENCH[@]}" --transformer-impl local --fp8-format hybrid --torch-compile \
  --json "$OUT/bench.json"
"$PY" -m megatron_ov3.perf.gpu_check summary "$OUT" > /dev/null
echo "summary: $OUT/summary.json"
