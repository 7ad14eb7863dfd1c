"""Command-line flags (Megatron-LM names) -> validated configs. Usage errors raise ``UsageError`` (exit 2)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from ..cli import Parser, UsageError
from ..models.sizes import SIZES


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m megatron_ov3.pretrain",
               description="Pre-train an OpenVision 3 encoder (megatron-core layers, DeepSpeed ZeRO).")
    g = p.add_argument_group("model")
    g.add_argument("--model-size", default="tiny", choices=SIZES, help="named size from the registry")
    g.add_argument("--image-size", type=int, default=256, help="training resolution (multiple of 16)")
    g.add_argument("--class-token", action="store_true", help="prepend a class token (open_clip-compatible)")
    g.add_argument("--register-tokens", type=int, default=0)
    g.add_argument("--position-embedding-type", default="sincos", choices=["sincos", "learned"],
                   help="encoder position embedding: fixed sincos-2d or a learned table (open_clip checkpoints)")
    g.add_argument("--pos-embed-ref-grid", type=int, default=16,
                   help="token grid of the position table (sincos: integer positions; learned: table size)")
    g.add_argument("--decoder-noise-tau", type=float, default=0.8)
    g.add_argument("--lpips-weight", type=float, default=0.0)
    g.add_argument("--lpips-path", default=None, help="local LPIPS-VGG state dict")
    g.add_argument("--pixel-l1-weight", type=float, default=1.0)
    g.add_argument("--latent-l1-weight", type=float, default=0.4)
    g.add_argument("--reconstruction-weight", type=float, default=0.5)
    g.add_argument("--caption-weight", type=float, default=1.0)
    g.add_argument("--contrastive-weight", type=float, default=1.0)
    g.add_argument("--vae-path", default=None, help="local diffusers AutoencoderKL folder (FLUX.1 VAE)")
    g.add_argument("--tiny-vae", action="store_true", help="random-init toy VAE of FLUX structure (CPU demo/tests)")
    g.add_argument("--vae-shift-factor", type=float, default=None,
                   help="latent = (mean - shift) * scale; default FLUX's 0.1159 (the official OV3 release uses 0)")
    g.add_argument("--vae-scaling-factor", type=float, default=None, help="default FLUX's 0.3611")
    g.add_argument("--pixel-loss-fraction", type=float, default=1.0,
                   help="decode only this fraction of each micro batch for the pixel loss (deviation; paper: 1)")
    g.add_argument("--vae-channels-last", action="store_true", help="VAE decoder in channels-last format")
    g.add_argument("--vae-autocast-bf16", action="store_true",
                   help="VAE decoder under bf16 autocast (its weights stay fp32)")
    g.add_argument("--vae-decode-compile", action="store_true", help="torch.compile the VAE decoder call")
    g.add_argument("--vae-decode-checkpoint", action="store_true",
                   help="recompute the VAE decoder's activations in backward (saves memory)")
    g.add_argument("--transformer-impl", default="auto", choices=["auto", "local", "te"])
    g.add_argument("--attention-backend", default="sdpa", choices=["sdpa", "unfused"])

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="shards, brace notation, sources joined with '::'")
    g.add_argument("--mock-data", action="store_true",
                   help="deterministic synthetic batches indexed by global sample (layout-independent; tests)")
    g.add_argument("--data-weights", type=float, nargs="+", default=None)
    g.add_argument("--data-resample", action="store_true")
    g.add_argument("--tokenizer", default=None, help="sentencepiece model (tools/train_tokenizer.py)")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--shuffle-buffer", type=int, default=1000)

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.2)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many consecutive non-finite losses")

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp8-format", default=None, choices=["hybrid", "e4m3"],
                   help="FP8 GEMMs in the transformer layers: Transformer Engine's with --transformer-impl te, "
                        "torchao float8 with local (emulated on CPU)")
    g.add_argument("--torch-compile", action="store_true",
                   help="torch.compile each transformer layer (in place; checkpoints unchanged)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap ZeRO-1/2 gradient reduction with backward (DeepSpeed overlap_comm)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="megatron sequence parallelism in the image encoder and decoder (needs TP > 1)")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from this checkpoint directory (its 'latest')")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save (with --save) and exit 0 after an iteration divisible by this (schedule unchanged)")
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--finetune-from", default=None,
                   help="stage 2: start from this checkpoint's model weights at a new resolution "
                        "(iteration, optimizer, scheduler and data position reset)")
    g.add_argument("--init-universal", default=None,
                   help="initialise the model weights from a universal checkpoint folder (e.g. an import)")
    g.add_argument("--no-save-universal", action="store_true",
                   help="do not add the layout-independent universal copy to checkpoints (no resharding then)")
    g.add_argument("--keep-optimizer", action="store_true",
                   help="with --finetune-from: also restore the optimizer state")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data-path", default=None, help="held-out image shards for in-training evaluation")
    g.add_argument("--eval-interval", type=int, default=None, help="evaluate every N iterations")
    g.add_argument("--eval-batches", type=int, default=10, help="micro-batches per evaluation and rank")
    g.add_argument("--eval-classnames", default=None, help="class-names file for zero-shot classification")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None,
                   help="append one JSON line per logged iteration (rank 0): losses, lr, grad norm, timings")
    g.add_argument("--wandb-project", default=None, help="log to wandb (offline unless WANDB_MODE says otherwise)")
    return p


@dataclass
class BatchPlan:
    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    grad_accum: int


def batch_plan(args, data_parallel_size: int) -> BatchPlan:
    mb, gb = args.micro_batch_size, args.global_batch_size
    if mb < 1 or gb < 1:
        raise UsageError("--micro-batch-size and --global-batch-size must be >= 1")
    if gb % (mb * data_parallel_size):
        raise UsageError(
            f"--global-batch-size {gb} is not divisible by --micro-batch-size {mb} x data-parallel size "
            f"{data_parallel_size}; use a multiple of {mb * data_parallel_size}"
        )
    return BatchPlan(mb, gb, data_parallel_size, gb // (mb * data_parallel_size))


def validate(args, world_size: int) -> None:
    """Checks that need no model: raise UsageError with the fix."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise UsageError("parallel sizes must be >= 1")
    if world_size % (tp * pp):
        raise UsageError(f"{world_size} processes are not divisible by TP {tp} x PP {pp}; change the sizes")
    if pp > 1 and args.zero_stage > 1:
        raise UsageError(
            f"--zero-stage {args.zero_stage} cannot be combined with pipeline parallelism (DeepSpeed refuses "
            f"ZeRO-2/3 with pipelining); use --zero-stage 1"
        )
    if pp > 1 and args.zero_stage == 0:
        raise UsageError("--zero-stage 0 cannot be combined with pipeline parallelism (DeepSpeed's ZeRO-0 gradient "
                         "clipping counts only the first stage's replicated parameters); use --zero-stage 1")
    if args.sequence_parallel:
        if tp == 1:
            raise UsageError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        grid = (args.image_size // 16) ** 2
        tokens = grid + int(args.class_token) + args.register_tokens
        for what, n in (("encoder", tokens), ("decoder", grid)):
            if n % tp:
                raise UsageError(f"--sequence-parallel: the {what}'s {n} tokens are not divisible by "
                                 f"--tensor-model-parallel-size {tp}; adjust --register-tokens or --image-size")
    if (args.train_iters is None) == (args.train_samples is None):
        raise UsageError("give exactly one of --train-iters and --train-samples")
    if any(v is not None and v < 1 for v in (args.train_iters, args.train_samples)):
        raise UsageError("--train-iters / --train-samples must be >= 1")
    if args.save_interval is not None and args.save_interval < 1:
        raise UsageError("--save-interval must be >= 1")
    if args.save_interval and not args.save:
        raise UsageError("--save-interval needs --save DIR")
    if args.keep_last is not None and args.keep_last < 1:
        raise UsageError("--keep-last must be >= 1")
    if args.log_interval < 1:
        raise UsageError("--log-interval must be >= 1")
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise UsageError("need 0 <= --min-lr <= --lr and --lr > 0")
    if not args.mock_data and not (args.data_path and args.tokenizer):
        raise UsageError("give --data-path and --tokenizer (or --mock-data)")
    if sum(bool(x) for x in (args.load, args.finetune_from, args.init_universal)) > 1:
        raise UsageError("--load, --finetune-from and --init-universal are exclusive")
    if not args.tiny_vae and not args.vae_path:
        raise UsageError("give --vae-path (local FLUX.1 VAE folder) or --tiny-vae")
    if args.eval_interval and not args.eval_data_path:
        raise UsageError("--eval-interval needs --eval-data-path")
    if args.eval_data_path and not args.tokenizer:
        raise UsageError("--eval-data-path needs --tokenizer")
    if args.keep_optimizer and not args.finetune_from:
        raise UsageError("--keep-optimizer only applies with --finetune-from")
