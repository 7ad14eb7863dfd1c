#!/usr/bin/env bash
# Tiny OV3 on CPU (or one small GPU): the same mechanism as pretrain_ov3_huge.sh.
#
#   deepspeed --num_gpus 2 examples/pretrain_ov3_tiny.sh [extra flags]   # 2 ranks (CPU: gloo)
#   bash examples/pretrain_ov3_tiny.sh [extra flags]                     # hands itself to the launcher (2 ranks)
#
# Batch arithmetic: 2 ranks, TP 1 -> DP 2; global 16 = micro 8 x DP 2 x accumulation 1; 64px -> 16 tokens.
''':'
set -euo pipefail
if [[ "${1:-}" != "--ov3-rank-entry" ]]; then
  exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_gpus "${NUM_GPUS:-2}" "$0" "$@"
fi
shift
: "${DATA_PATH:?set DATA_PATH (tools/make_synthetic_data.py makes a small dataset)}"
: "${TOKENIZER:?set TOKENIZER (tools/train_tokenizer.py)}"
CHECKPOINT_PATH=${CHECKPOINT_PATH:-runs/ov3-tiny}
exec "${OV3_PYTHON:-python}" -u -m megatron_ov3.pretrain \
  --model-size tiny --image-size "${IMAGE_SIZE:-64}" --tiny-vae \
  --data-path "$DATA_PATH" --tokenizer "$TOKENIZER" --num-workers "${NUM_WORKERS:-1}" --shuffle-buffer 200 \
  --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}" \
  --micro-batch-size "${MICRO_BATCH:-8}" --global-batch-size "${GLOBAL_BATCH:-16}" --train-iters "${TRAIN_ITERS:-100}" \
  --lr 2e-3 --min-lr 1e-4 --lr-warmup-iters 5 --weight-decay 0.05 --clip-grad 1.0 --zero-stage 1 \
  --save "$CHECKPOINT_PATH" --save-interval "${SAVE_INTERVAL:-50}" --keep-last 2 \
  --log-interval "${LOG_INTERVAL:-10}" --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" \
  "$@"
':'''
import os, sys  # noqa: E401  (Python part: run by the DeepSpeed launcher on every rank)

os.environ["OV3_PYTHON"] = sys.executable  # the interpreter the launcher chose (e.g. a virtualenv's)
os.execvp("bash", ["bash", os.path.abspath(__file__), "--ov3-rank-entry"] + sys.argv[1:])
