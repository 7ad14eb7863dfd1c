#!/usr/bin/env python
"""The main job on a CPU machine (``make demo``).

Until the training entry point lands this runs forward/backward of a tiny OV3 (random-init toy VAE of the
FLUX structure, synthetic images and captions) for a few optimizer steps on one batch and prints every loss.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_ov3 import parallel  # noqa: E402
from megatron_ov3.models import LOSS_NAMES, FrozenVAE, build_model, get_config  # noqa: E402


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    parallel.initialize_model_parallel(1, 1, seed=0)
    cfg = get_config("tiny", image_size=64)
    model = build_model(cfg, vae=FrozenVAE.tiny(seed=0))
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.rand(8, 3, 64, 64, generator=g) * 2 - 1,
        "text_ids": torch.randint(3, cfg.vocab_size, (8, cfg.text_context_length), generator=g),
        "caption_ids": torch.randint(3, cfg.vocab_size, (8, cfg.caption_length), generator=g),
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny OV3: {n:,} trainable parameters; VAE frozen ({sum(p.numel() for p in model.vae.parameters()):,})")
    for step in range(1, 11):
        t = time.time()
        out = model(batch)
        opt.zero_grad()
        out["total_loss"].backward()
        opt.step()
        losses = " ".join(f"{k} {float(out[k]):.4f}" for k in ("total_loss",) + LOSS_NAMES if k in out)
        print(f"step {step:2d} | {losses} | {time.time() - t:.2f}s")


if __name__ == "__main__":
    main()
