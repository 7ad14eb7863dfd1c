#!/usr/bin/env bash
# The main job on a CPU machine (`make demo`): synthetic shards + tokenizer, then a tiny OV3 trained by
# 2 processes through the real DeepSpeed launcher for 100 iterations; prints the losses and the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"
if [[ ! -f "$OUT/data/sizes.json" ]]; then
  python tools/make_synthetic_data.py --output-dir "$OUT/data" --num-samples 2000 --samples-per-shard 100 --image-size 64
fi
if [[ ! -f "$OUT/heldout/sizes.json" ]]; then
  python tools/make_synthetic_data.py --output-dir "$OUT/heldout" --num-samples 200 --samples-per-shard 50 --image-size 64 --seed 99
fi
printf 'circle\nsquare\ntriangle\n' > "$OUT/classes.txt"
if [[ ! -f "$OUT/tokenizer.model" ]]; then
  python tools/train_tokenizer.py --data-path "$OUT/data/synthetic-{00000..00019}.tar" --output-prefix "$OUT/tokenizer" --vocab-size 256
fi
rm -rf "$OUT/checkpoints" "$OUT/metrics.jsonl"
DATA_PATH="$OUT/data/synthetic-{00000..00019}.tar" TOKENIZER="$OUT/tokenizer.model" CHECKPOINT_PATH="$OUT/checkpoints" \
  deepspeed --num_gpus 2 examples/pretrain_ov3_tiny.sh --train-iters "${TRAIN_ITERS:-100}" \
  --metrics-file "$OUT/metrics.jsonl" 2>&1 | grep -v -E "^\[20|FutureWarning|return func|warnings.warn|UserWarning"
for which in trained untrained; do
  python tools/evaluate.py --load "$OUT/checkpoints" --data-path "$OUT/heldout/synthetic-{00000..00003}.tar" \
    --tokenizer "$OUT/tokenizer.model" --classnames "$OUT/classes.txt" --micro-batch-size 50 \
    --output "$OUT/eval-$which" $([[ $which == untrained ]] && echo --untrained) > /dev/null
done
python - "$OUT/metrics.jsonl" "$OUT/checkpoints" "$OUT" <<'PY'
import json, os, sys
m = [json.loads(l) for l in open(sys.argv[1])]
first, last = m[0], m[-1]
print(f"\nlosses, iteration {first['iteration']} -> {last['iteration']}:")
for k in ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1"):
    print(f"  {k:17s} {first[k]:.4f} -> {last[k]:.4f}")
tag = open(os.path.join(sys.argv[2], "latest")).read().strip()
print(f"checkpoint: {os.path.abspath(os.path.join(sys.argv[2], tag))}")
t = json.load(open(os.path.join(sys.argv[3], "eval-trained", "report.json")))
u = json.load(open(os.path.join(sys.argv[3], "eval-untrained", "report.json")))
print(f"\nheld-out evaluation ({t['num_images']} images)   untrained -> trained")
for k in ("psnr", "ssim", "retrieval_i2t_R@1", "retrieval_i2t_R@5", "retrieval_t2i_R@5", "zeroshot_top1"):
    print(f"  {k:20s} {u[k]:8.4f} -> {t[k]:8.4f}")
print(f"picture grid: {os.path.abspath(os.path.join(sys.argv[3], 'eval-trained', 'grid.png'))}")
PY
