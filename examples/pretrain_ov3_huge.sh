#!/usr/bin/env bash
# OV3-H pre-training recipe (stage 2: 256px), as in the paper's second stage.
#
#   deepspeed [--hostfile hosts] examples/pretrain_ov3_huge.sh [extra flags]   # what the launcher runs per rank
#   bash examples/pretrain_ov3_huge.sh [extra flags]                           # hands itself to the launcher
#
# This file is both a bash script and a Python file: the DeepSpeed launcher runs `python -u THIS --local_rank=N`
# on every rank of every host; the Python part below re-executes it with bash, which builds the flags and
# execs `python -m megatron_ov3.pretrain` in the same process. Flags after the script override the recipe.
#
# Batch arithmetic (defaults: 8 nodes x 8 GPUs = 64 GPUs, TP 1, PP 1):
#   data-parallel size DP = GPUs / (TP * PP)             = 64
#   global batch 4096 = micro 32 x DP 64 x accumulation 2
#   tokens per image at 256px: (256 / 8 VAE / 2 patch)^2 = 256
# Stage 1 (128px, global 8192) is the same command with IMAGE_SIZE=128 GLOBAL_BATCH=8192; stage 2 starts
# from it with FINETUNE_FROM=<stage-1 checkpoint dir> (optimizer reset; add --keep-optimizer to keep it).
''':'
set -euo pipefail
if [[ "${1:-}" != "--ov3-rank-entry" ]]; then
  exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} "$0" "$@"
fi
shift
: "${DATA_PATH:?set DATA_PATH to your shards, e.g. /data/recap-datacomp/{000000..099999}.tar}"
: "${TOKENIZER:?set TOKENIZER to a sentencepiece model (tools/train_tokenizer.py)}"
: "${VAE_PATH:?set VAE_PATH to a local FLUX.1 VAE folder (e.g. FLUX.1-dev/vae)}"
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/ov3-huge}
TP=${TP:-1}; PP=${PP:-1}
IMAGE_SIZE=${IMAGE_SIZE:-256}
MICRO_BATCH=${MICRO_BATCH:-32}
GLOBAL_BATCH=${GLOBAL_BATCH:-4096}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-256000000}
FP8=()
if "${OV3_PYTHON:-python}" -c "import transformer_engine.pytorch" 2>/dev/null; then FP8=(--fp8-format hybrid); fi
RESUME=()
if [[ -n "${FINETUNE_FROM:-}" ]]; then RESUME=(--finetune-from "$FINETUNE_FROM");
elif [[ -f "$CHECKPOINT_PATH/latest" ]]; then RESUME=(--load "$CHECKPOINT_PATH"); fi
exec "${OV3_PYTHON:-python}" -u -m megatron_ov3.pretrain \
  --model-size H --image-size "$IMAGE_SIZE" \
  --data-path "$DATA_PATH" --tokenizer "$TOKENIZER" --vae-path "$VAE_PATH" --num-workers 8 \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-samples "$TRAIN_SAMPLES" \
  --lr 5e-4 --min-lr 1e-6 --lr-warmup-iters 2000 --weight-decay 0.2 --adam-beta1 0.9 --adam-beta2 0.95 \
  --clip-grad 1.0 --bf16 "${FP8[@]}" --zero-stage 1 --overlap-grad-reduce --vae-channels-last --vae-autocast-bf16 \
  --save "$CHECKPOINT_PATH" --save-interval 1000 --keep-last 3 "${RESUME[@]}" \
  --log-interval 10 --tensorboard-dir "${TENSORBOARD_DIR:-$CHECKPOINT_PATH/tensorboard}" \
  "$@"
':'''
import os, sys  # noqa: E401  (Python part: run by the DeepSpeed launcher on every rank)

os.environ["OV3_PYTHON"] = sys.executable  # the interpreter the launcher chose (e.g. a virtualenv's)
os.execvp("bash", ["bash", os.path.abspath(__file__), "--ov3-rank-entry"] + sys.argv[1:])
