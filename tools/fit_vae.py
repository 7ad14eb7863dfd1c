#!/usr/bin/env python
"""Fit a small VAE of the FLUX structure (16 latent channels, 8x) to the images of some shards and save it as a
diffusers folder for ``--vae-path``. For offline demos and tests, where no FLUX.1 download exists: it is not a
replacement for FLUX (``megatron_ov3/models/vae_fit.py`` says how it is trained).

  python tools/fit_vae.py --data-path 'data/synthetic-{00000..00019}.tar' --image-size 64 --steps 1000 --output vae/
"""
import json
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def load_images(data_path: str, image_size: int, limit: int):
    """Up to ``limit`` decoded images (N, 3, S, S) in [-1, 1] from shards, centre-cropped."""
    import torch

    from megatron_ov3.data.pipeline import decode_image
    from megatron_ov3.data.shards import expand_urls, image_bytes, iter_tar_samples

    out = []
    for url in (u for src in expand_urls(data_path) for u in src):
        for smp in iter_tar_samples(url, lambda *a: None):
            data = image_bytes(smp)
            img = decode_image(data, image_size) if data is not None else None
            if isinstance(img, torch.Tensor):
                out.append(img)
            if len(out) >= limit:
                return torch.stack(out)
    if not out:
        raise UsageError(f"--data-path {data_path!r} yielded no decodable image")
    return torch.stack(out)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="image shards (brace notation, '::' joins)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--output", required=True, help="new or empty folder for the diffusers VAE")
    p.add_argument("--steps", type=int, default=1000, help="fitting steps (a number, not a time budget: the same "
                   "VAE on any machine)")
    p.add_argument("--width", type=int, default=16, help="channels per level (FLUX: 128-512)")
    p.add_argument("--crop", type=int, default=None, help="train on random crops of this size (default: half the "
                   "image size; the VAE is convolutional)")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the posterior's KL term (FLUX-style "
                   "VAEs keep it small; too small leaves latents OV3 cannot predict)")
    p.add_argument("--max-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.image_size % 8 or args.image_size < 16:
        raise UsageError(f"--image-size {args.image_size} must be a multiple of 8 and >= 16")
    if args.steps < 1 or args.width < 8 or not 0 <= args.kl_weight < float("inf"):
        raise UsageError(f"--steps {args.steps} must be >= 1, --width {args.width} >= 8 and --kl-weight "
                         f"{args.kl_weight} a finite number >= 0")
    from megatron_ov3.models.vae_fit import fit_vae, reconstruction_psnr
    from megatron_ov3.outputs import claim

    images = load_images(args.data_path, args.image_size, args.max_images)
    claim(args.output, "fit_vae", "--output")
    held = max(1, len(images) // 10)
    crop = args.crop or max(16, args.image_size // 2 // 8 * 8)
    ae, summary = fit_vae(images[held:], steps=args.steps, width=args.width, seed=args.seed, crop=crop,
                          kl_weight=args.kl_weight)
    summary.update(images=len(images) - held, heldout_images=held, heldout_psnr=reconstruction_psnr(ae, images[:held]))
    ae.save_pretrained(args.output, safe_serialization=True)
    with open(os.path.join(args.output, "fit_vae.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"fitted VAE ({summary['steps']} steps, {summary['seconds']:.0f}s on {summary['images']} images): "
          f"held-out reconstruction PSNR {summary['heldout_psnr']:.1f} dB -> {args.output} (use --vae-path)")
    return 0


if __name__ == "__main__":
    exit_with(main)
