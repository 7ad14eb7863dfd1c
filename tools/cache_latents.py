#!/usr/bin/env python
"""Encode image shards once with the frozen VAE into latent shards (fp16 latents + captions).

Resumable (finished shards are skipped), atomic per shard, and parallel: run one process per GPU with
torchrun (RANK/WORLD_SIZE) or pass --rank/--world-size; processes take disjoint shards."""
import dataclasses
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with
from megatron_ov3.data.pipeline import DataConfig

DATA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)}


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--data-path", required=True, help="image shards (brace notation, '::' joins)")
    p.add_argument("--output-dir", required=True, help="new or empty folder, or an earlier cache_latents output "
                   "(resumed: its finished shards are kept, the rest written)")
    p.add_argument("--image-size", type=int, required=True, help="resolution of the training stage")
    vae = p.add_mutually_exclusive_group(required=True)
    vae.add_argument("--vae-path", help="local diffusers AutoencoderKL folder (e.g. FLUX.1-dev/vae)")
    vae.add_argument("--tiny-vae", action="store_true", help="random-init toy VAE of FLUX structure (tests)")
    p.add_argument("--vae-shift-factor", type=float, default=None,
                   help="must match training's --vae-shift-factor (default FLUX's 0.1159)")
    p.add_argument("--vae-scaling-factor", type=float, default=None,
                   help="must match training's --vae-scaling-factor (default FLUX's 0.3611)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--bf16", action="store_true", help="run the VAE in bfloat16")
    g = p.add_argument_group("augmented views (a latent cannot be augmented after encoding)")
    g.add_argument("--augment-views", type=int, default=0, help="cache N augmented views per image (training "
                   "draws one per epoch; needs training with augmentation on); 0: one centre crop (train with "
                   "--no-augment)")
    for name in ("crop_min_area", "color_jitter", "grayscale_prob", "seed"):
        g.add_argument("--" + name.replace("_", "-"), type=type(DATA_DEFAULTS[name]), default=DATA_DEFAULTS[name],
                       help=f"seed of the views (default {DATA_DEFAULTS[name]})" if name == "seed" else
                       f"as training's flag (default {DATA_DEFAULTS[name]}); must match it")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image_size % 16 or args.image_size < 16:
        raise UsageError(f"--image-size {args.image_size} must be a positive multiple of 16 (training's value)")
    if args.augment_views < 0:
        raise UsageError(f"--augment-views must be >= 0, got {args.augment_views}")
    if not 0 <= args.rank < args.world_size:
        raise UsageError(f"--rank {args.rank} must lie in [0, --world-size {args.world_size})")
    from megatron_ov3.models.vae import VAEConfig
    from megatron_ov3.options import check_numbers

    check_numbers(VAEConfig(vae_shift_factor=args.vae_shift_factor, vae_scaling_factor=args.vae_scaling_factor))
    views = DataConfig(crop_min_area=args.crop_min_area, color_jitter=args.color_jitter,
                       grayscale_prob=args.grayscale_prob)  # checked as training checks the same values
    import torch

    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device here; leave --device out (cpu) or run on a GPU")
    from megatron_ov3.data.latent_cache import cache_latents, input_shards
    from megatron_ov3.outputs import check_claim, claim

    check_claim(args.output_dir, "cache_latents", "--output-dir")
    from megatron_ov3.models import FrozenVAE

    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    kw = dict(scaling_factor=args.vae_scaling_factor, shift_factor=args.vae_shift_factor)
    model = FrozenVAE.tiny(**kw) if args.tiny_vae else FrozenVAE.from_pretrained(args.vae_path, **kw)
    input_shards(args.data_path)
    claim(args.output_dir, "cache_latents", "--output-dir")  # after every input is checked: nothing written before
    if args.bf16:
        model = model.to(torch.bfloat16)
    aug = views.augmentation() if args.augment_views else None
    stats = cache_latents(args.data_path, args.output_dir, model, args.image_size, args.batch_size,
                          args.rank, args.world_size, device, views=args.augment_views, aug=aug, seed=args.seed)
    print(f"rank {args.rank}: {stats}")


if __name__ == "__main__":
    exit_with(main)
