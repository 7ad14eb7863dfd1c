#!/usr/bin/env bash
# Issue 7's GPU measurement in one go, on one H100/H200: the GPU correctness tests, then every benchmark whose
# numbers and ratios the README's performance section reports, then the markdown table.
#
#   bash examples/benchmark_gpu.sh OUT_DIR [VENDOR_PEAK_TFLOPS]      # default peak: 989 (H100 SXM dense bf16)
#
# Needs a CUDA torch, megatron-core, deepspeed and diffusers (pip install -e .); torchao for the torchao FP8 row
# (pip install -e .[fp8]); Transformer Engine for the TE rows. VAE_PATH=/local/FLUX.1-vae uses real weights
# (same cost as the default random-init VAE of the same architecture).
set -u  # no -e: a failing benchmark is reported and the next one runs (examples/gpu_check.sh is the first-run check)
OUT=${1:?usage: bash examples/benchmark_gpu.sh OUT_DIR [VENDOR_PEAK_TFLOPS]}
PEAK=${2:-989}
PY=${OV3_PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
has() { "$PY" -c "import $1" 2>/dev/null; }

"$PY" -m pytest -q -rs tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt"

bench() { "$PY" tools/benchmark.py --image-size 256 --peak-tflops "$PEAK" ${VAE_PATH:+--vae-path "$VAE_PATH"} "$@"; }
only_step=(--no-naive --no-bare --no-vae-decode --no-breakdown)
# whole step vs the naive step, encoder vs bare ViT (eager + compiled) and megatron local, VAE decode vs eager
bench --model-size H --micro-batch-size 32 --bare-compile --json "$OUT/H.json"
# per-layer torch.compile vs eager layers
bench --model-size H --micro-batch-size 32 --torch-compile "${only_step[@]}" --json "$OUT/H_compile.json"
# FP8 vs the same step without it: torchao float8 (local layers; compiled, since eager float8 is slower than bf16 by
# construction: the benchmark then times FP8 vs bf16 both compiled), and Transformer Engine when it imports
if has torchao.float8; then
  bench --model-size H --micro-batch-size 32 --transformer-impl local --fp8-format hybrid --torch-compile "${only_step[@]}" \
    --json "$OUT/H_fp8_torchao.json"
fi
if has transformer_engine.pytorch; then
  bench --model-size H --micro-batch-size 32 --transformer-impl te --fp8-format hybrid "${only_step[@]}" \
    --json "$OUT/H_fp8_te.json"
fi
# largest micro batches, without and with full recomputation
for size in H g; do
  bench --model-size "$size" --micro-batch-size 8 --steps 1 --warmup 1 --find-max-micro-batch "${only_step[@]}" \
    --json "$OUT/${size}_max_micro_batch.json"
done
"$PY" tools/bench_table.py "$OUT"/*.json | tee "$OUT/table.md"
