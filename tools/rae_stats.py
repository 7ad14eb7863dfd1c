#!/usr/bin/env python
"""Per-token normalisation statistics for RAE: mean and variance of the OV3 encoder's tokens over a set of
image shards, saved as {"mean", "var"} of shape (1, C, h, w) (broadcastable to RAE's (B, C, H, W) latents)."""
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--export", required=True, help="folder written by convert_to_hf.py")
    p.add_argument("--data-path", required=True, help="image shards (brace notation)")
    p.add_argument("--output", default=None, help="stats file to write (default: EXPORT/rae/stat.pt, where the "
                   "export's rae_stage1.yaml points RAE's normalization_stat_path)")
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    import torch
    from tqdm import tqdm

    from megatron_ov3.data.pipeline import decode_image
    from megatron_ov3.data.shards import expand_urls, image_bytes, iter_tar_samples

    if not os.path.isfile(os.path.join(args.export, "rae_ov3.py")):
        raise UsageError(f"{args.export!r} is not a megatron_ov3 export (no rae_ov3.py)")
    import sys

    sys.path.insert(0, args.export)
    from rae_ov3 import OV3RAEEncoder

    enc = OV3RAEEncoder(args.export)
    if args.output is None:
        os.makedirs(os.path.join(args.export, "rae"), exist_ok=True)
        args.output = os.path.join(args.export, "rae", "stat.pt")
    size = enc.model.config.image_size
    total, s1, s2 = 0, None, None
    batch = []

    def flush():
        nonlocal total, s1, s2
        tok = enc(torch.stack(batch)).double()  # (B, N, C)
        b, n, c = tok.shape
        g = int(n ** 0.5)
        grid = tok.transpose(1, 2).reshape(b, c, g, g)
        s1 = grid.sum(0) if s1 is None else s1 + grid.sum(0)
        s2 = (grid ** 2).sum(0) if s2 is None else s2 + (grid ** 2).sum(0)
        total += b
        batch.clear()

    with tqdm(total=args.num_samples, desc="tokens", unit="img") as bar:
        for url in (u for src in expand_urls(args.data_path) for u in src):
            for smp in iter_tar_samples(url, lambda *a: None):
                data = image_bytes(smp)
                img = decode_image(data, size) if data is not None else None
                if img is None:
                    continue
                batch.append(img)
                bar.update(1)
                if len(batch) == args.batch_size:
                    flush()
                if total + len(batch) >= args.num_samples:
                    break
            if total + len(batch) >= args.num_samples:
                break
    if batch:
        flush()
    if total == 0:
        raise UsageError("no decodable image found in --data-path")
    mean = s1 / total
    var = (s2 / total - mean ** 2).clamp(min=0)
    torch.save({"mean": mean[None].float(), "var": var[None].float()}, args.output)
    print(f"wrote {args.output}: mean/var of shape {tuple(mean[None].shape)} over {total} images")


if __name__ == "__main__":
    exit_with(main)
