#!/usr/bin/env bash
# The main job on a CPU machine (`make demo`), offline:
#   1. synthetic shards (1-3 coloured shapes; captions say what and where; 24 colour x shape classes) + tokenizer
#   2. a small VAE of the FLUX structure fitted to those images for VAE_STEPS seeded steps (tools/fit_vae.py) -- OV3 needs a
#      *pretrained* frozen VAE, and with no FLUX download this is the honest stand-in (not a FLUX replacement)
#   3. a tiny OV3 (no augmentation: the captions name each shape's place and colour, which crops and colour jitter
#      would contradict) trained with that VAE frozen (--vae-path, FLUX's loading code) by 2 processes through the real
#      DeepSpeed launcher (global batch 32: more negatives for the contrastive loss; lr 3e-3), then evaluated trained
#      vs untrained on held-out shards. Every step is seeded and counted in steps, not seconds: two runs on any
#      machine, loaded or not, print the same numbers
#   4. the report: losses, VAE vs OV3 reconstruction, retrieval/zero-shot with chance, grid.png and curves.png
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_DIR:-runs/demo}
NUM=${NUM_SAMPLES:-2000}
ITERS=${TRAIN_ITERS:-300}
VAE_STEPS=${VAE_STEPS:-2000}
LAST=$(printf '%05d' $(( NUM / 100 - 1 )))
TRAIN="$OUT/data/synthetic-{00000..$LAST}.tar"
mkdir -p "$OUT"
[[ -f "$OUT/data/sizes.json" ]] || python tools/make_synthetic_data.py --output-dir "$OUT/data" \
  --num-samples "$NUM" --samples-per-shard 100 --image-size 64
[[ -f "$OUT/heldout/sizes.json" ]] || python tools/make_synthetic_data.py --output-dir "$OUT/heldout" \
  --num-samples 200 --samples-per-shard 50 --image-size 64 --seed 99
[[ -f "$OUT/tokenizer.model" ]] || python tools/train_tokenizer.py --data-path "$TRAIN" \
  --output-prefix "$OUT/tokenizer" --vocab-size 256
[[ -f "$OUT/vae/fit_vae.json" ]] || python tools/fit_vae.py --data-path "$TRAIN" --image-size 64 \
  --steps "$VAE_STEPS" --output "$OUT/vae"
rm -rf "$OUT/checkpoints" "$OUT/metrics.jsonl" "$OUT/eval-trained" "$OUT/eval-untrained"
DATA_PATH="$TRAIN" TOKENIZER="$OUT/tokenizer.model" CHECKPOINT_PATH="$OUT/checkpoints" \
  deepspeed --num_gpus 2 examples/pretrain_ov3_tiny.sh --train-iters "$ITERS" --no-tiny-vae --vae-path "$OUT/vae" \
  --no-augment --micro-batch-size 16 --global-batch-size 32 --lr 3e-3 --metrics-file "$OUT/metrics.jsonl" 2>&1 | grep -v -E "^\[20|FutureWarning|return func|warnings.warn|UserWarning"
for which in trained untrained; do
  python tools/evaluate.py --load "$OUT/checkpoints" --data-path "$OUT/heldout/synthetic-{00000..00003}.tar" \
    --tokenizer "$OUT/tokenizer.model" --classnames "$OUT/heldout/classes.txt" \
    --templates "$OUT/heldout/templates.txt" --micro-batch-size 50 \
    --output "$OUT/eval-$which" $([[ $which == untrained ]] && echo --untrained) > /dev/null
done
echo
python tools/demo_report.py --demo-dir "$OUT"
