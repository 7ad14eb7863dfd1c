#!/usr/bin/env python
"""Time whole OV3 training steps against a naive OV3 step, a bare PyTorch ViT of the encoder's shape, the
megatron-core local-spec encoder and the matmul peak, all in the same run (megatron_ov3/perf/benchmark.py).

  python tools/benchmark.py --model-size H --image-size 256 --micro-batch-size 64 --json bench.json
  deepspeed --num_gpus 2 tools/benchmark.py --model-size g --tensor-model-parallel-size 2 ...   (or torchrun)
  python tools/benchmark.py --model-size tiny --image-size 64 --micro-batch-size 4 --tiny-vae   # CPU

Prints step time, images/s, TFLOP/s, MFU (every part's FLOPs, VAE included), peak memory, the fast step's
per-part times and the ratios; --json writes everything, with date, device and versions."""
import json
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with
from megatron_ov3.models.sizes import SIZES


def main(argv=None):
    from megatron_ov3.config.tree import add_flags, cli_overrides
    from megatron_ov3.models.config import LayerImplConfig

    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="tiny", choices=SIZES)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--input", default="latents", choices=["latents", "images"],
                   help="fast step input: latent cache (no VAE encode) or images")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pixel-loss-fraction", type=float, default=1.0)
    p.add_argument("--vae-path", default=None, help="local FLUX.1 VAE (default: random-init, same architecture)")
    p.add_argument("--tiny-vae", action="store_true", help="toy VAE (CPU tests)")
    p.add_argument("--no-vae-fast", action="store_true", help="fast step without the VAE decode options")
    p.add_argument("--vae-decode-compile", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="torch.compile the VAE decoder (default: on with CUDA)")
    p.add_argument("--vae-decode-checkpoint", action="store_true")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-bare", action="store_true")
    p.add_argument("--bare-compile", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="also time the compiled bare ViT (default: on with CUDA)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--no-vae-decode", action="store_true", help="skip timing the VAE decode alone")
    p.add_argument("--peak-tflops", type=float, default=None, help="vendor peak for a second MFU (H100: 989)")
    p.add_argument("--find-max-micro-batch", action="store_true", help="CUDA only")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    # the fast step's layers: the training job's own flags and names (bf16 on by default here: --no-bf16)
    add_flags(p, "layers", LayerImplConfig, "layers and precision (as in training)", defaults={"bf16": True})
    args = p.parse_args(argv)
    layers = LayerImplConfig(**{"bf16": True, **cli_overrides(args).get("layers", {})})
    if args.image_size % 16 or args.image_size <= 0:
        raise UsageError(f"--image-size {args.image_size} is not a positive multiple of 16")
    if args.micro_batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise UsageError("--micro-batch-size and --steps must be >= 1, --warmup >= 0")
    if not 0 < args.pixel_loss_fraction <= 1:
        raise UsageError(f"--pixel-loss-fraction {args.pixel_loss_fraction} must lie in (0, 1]")
    if args.vae_path and args.tiny_vae:
        raise UsageError("give --vae-path or --tiny-vae, not both")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.tensor_model_parallel_size:
        raise UsageError(f"{world} processes are not divisible by --tensor-model-parallel-size "
                         f"{args.tensor_model_parallel_size}")
    import torch

    from megatron_ov3 import parallel
    from megatron_ov3.models import VAEDecodeConfig
    from megatron_ov3.perf.benchmark import BenchConfig, format_report, run_benchmark

    cuda = torch.cuda.is_available()
    on = lambda v: cuda if v is None else v  # noqa: E731
    fast = VAEDecodeConfig() if args.no_vae_fast else VAEDecodeConfig(
        channels_last=True, autocast_bf16=layers.bf16, compile=on(args.vae_decode_compile),
        checkpoint=args.vae_decode_checkpoint)
    bc = BenchConfig(size=args.model_size, image_size=args.image_size, micro_batch=args.micro_batch_size,
                     steps=args.steps, warmup=args.warmup, layers=layers, input=args.input,
                     pixel_loss_fraction=args.pixel_loss_fraction,
                     vae_decode=fast, vae_path=args.vae_path, tiny_vae=args.tiny_vae, naive=not args.no_naive,
                     bare=not args.no_bare, bare_compile=on(args.bare_compile), breakdown=not args.no_breakdown,
                     vae_decode_alone=not args.no_vae_decode,
                     peak_tflops=args.peak_tflops, find_max_micro_batch=args.find_max_micro_batch)
    parallel.initialize_model_parallel(args.tensor_model_parallel_size, 1)
    rep = run_benchmark(bc)
    rep["layout"] = {"tensor_parallel": args.tensor_model_parallel_size,
                     "data_parallel": world // args.tensor_model_parallel_size}
    rep["note"] = ("images/s and TFLOP/s are per model replica (TP devices); MFU is per device; multiply images/s "
                   "by data_parallel for the whole job")
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_report(rep))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=1, default=str)
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    exit_with(main)
