#!/usr/bin/env python
"""Can augmentation happen after latent caching? Measures how far a crop taken in latent space is from the latent
of the cropped image, i.e. whether "cache at a larger resolution, crop in latent space" keeps the reconstruction
target right.

For each image an inception crop box (area 40-100 %, as training) is drawn; then
  true      = VAE.encode(the crop resampled to --image-size)        (what training encodes, and what
                                                                      cache_latents --augment-views caches)
  latent    = the same box cut from VAE.encode(the image at --cache-size), resampled (bilinear, antialiased)
              to --image-size / 8 in latent space
and reported: the latent's relative L1 error, and the PSNR against the crop's pixels of VAE.decode(true) and
VAE.decode(latent). The colour jitter is not measured: it acts on pixels and has no latent-space form at all.
Square sources (the crop box must lie inside the cached square).

  python tools/bench_latent_crop.py --data-path 'shards/{00000..00009}.tar' --vae-path vae/ --image-size 64
"""
import json

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def psnr(a, b) -> float:
    import torch

    mse = torch.mean(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).item()
    return 10 * __import__("math").log10(1 / max(mse, 1e-12))


def measure(vae, sources, size: int, cache_size: int, seed: int) -> dict:
    """``sources``: square PIL images. Mean relative latent L1 and PSNRs over them."""
    import random

    import torch
    import torch.nn.functional as F

    from megatron_ov3.data.images import crop_resize, inception_box, planar

    rng = random.Random(seed)
    rel, p_true, p_latent = [], [], []
    to_x = lambda im: torch.from_numpy(planar(im)).div_(127.5).sub_(1.0)[None]  # noqa: E731
    for src in sources:
        n = src.size[0]
        left, top, w, h = inception_box(n, n, 0.4, rng)
        view = to_x(crop_resize(src.copy(), (left, top, w, h), size))
        big = to_x(crop_resize(src.copy(), (0, 0, n, n), cache_size))
        with torch.no_grad():
            z_true, z_big = vae.encode(view), vae.encode(big)
            s = cache_size / n / 8  # source pixels -> cached latent cells
            y0, y1, x0, x1 = round(top * s), round((top + h) * s), round(left * s), round((left + w) * s)
            z_lat = F.interpolate(z_big[..., y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)], size=(size // 8, size // 8),
                                  mode="bilinear", antialias=True, align_corners=False)
            rel.append(((z_lat - z_true).abs().mean() / z_true.abs().mean()).item())
            p_true.append(psnr(vae.decode(z_true), view))
            p_latent.append(psnr(vae.decode(z_lat), view))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"images": len(sources), "latent_rel_l1": mean(rel), "psnr_true_latent": mean(p_true),
            "psnr_latent_crop": mean(p_latent), "image_size": size, "cache_size": cache_size}


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="image shards (square images)")
    vae = p.add_mutually_exclusive_group(required=True)
    vae.add_argument("--vae-path", help="local diffusers AutoencoderKL folder (FLUX.1 VAE, or tools/fit_vae.py's)")
    vae.add_argument("--tiny-vae", action="store_true", help="random-init toy VAE (tests only: meaningless numbers)")
    p.add_argument("--image-size", type=int, default=256, help="the training view's resolution")
    p.add_argument("--cache-size", type=int, default=None, help="resolution cached (default 2x --image-size)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cache = args.cache_size or 2 * args.image_size
    if args.image_size % 16 or cache % 16 or cache < args.image_size or args.num_images < 1:
        raise UsageError("--image-size and --cache-size must be multiples of 16, --cache-size >= --image-size, "
                         "--num-images >= 1")
    import io

    from PIL import Image

    from megatron_ov3.data.shards import expand_urls, image_bytes, iter_tar_samples
    from megatron_ov3.models import FrozenVAE

    model = FrozenVAE.tiny() if args.tiny_vae else FrozenVAE.from_pretrained(args.vae_path)
    sources = []
    for url in (u for src in expand_urls(args.data_path) for u in src):
        for smp in iter_tar_samples(url, lambda *a: None):
            im = Image.open(io.BytesIO(image_bytes(smp) or b"")).convert("RGB") if image_bytes(smp) else None
            if im is not None and im.size[0] == im.size[1]:
                sources.append(im)
        if len(sources) >= args.num_images:
            break
    if not sources:
        raise UsageError(f"--data-path {args.data_path!r} holds no square image")
    res = measure(model, sources[:args.num_images], args.image_size, cache, args.seed)
    print(json.dumps(res) if args.json else
          f"{res['images']} images, view {args.image_size}px, cache {cache}px: latent-space crop differs from the "
          f"crop's latent by {100 * res['latent_rel_l1']:.1f}% (relative L1); decoded PSNR against the crop: "
          f"true latent {res['psnr_true_latent']:.2f} dB, latent-space crop {res['psnr_latent_crop']:.2f} dB")


if __name__ == "__main__":
    exit_with(main)
