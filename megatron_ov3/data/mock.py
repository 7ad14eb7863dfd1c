"""Deterministic synthetic batches indexed by *global* sample number (Megatron's ``--mock-data``).

Sample i is generated from (seed, i) alone, and iteration t of a run with global batch G always holds samples
[t*G, (t+1)*G): micro-batch m of data-parallel rank r gets [t*G + (m*D + r)*B, ... + B). So any tensor /
pipeline / data-parallel layout with the same global batch sees the same samples in the same step, which is
what the parallel-equivalence and resharded-resume tests need, and the data position is just ``consumed``.
Images are random, captions are full-length (no padding: every micro-batch has the same token count).
"""
from __future__ import annotations

from typing import Dict

import torch


class MockData:
    def __init__(self, image_size: int, vocab_size: int, micro_batch_size: int, grad_accum: int, dp_rank: int,
                 dp_size: int, text_length: int = 80, caption_length: int = 128, seed: int = 1234,
                 state: dict = None):
        self.image_size, self.vocab = image_size, vocab_size
        self.mb, self.ga, self.r, self.d = micro_batch_size, grad_accum, dp_rank, dp_size
        self.text_length, self.caption_length, self.seed = text_length, caption_length, seed
        self.consumed = int((state or {}).get("consumed", 0))
        self.micro = 0

    def sample(self, i: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.image_size
        low = torch.rand(1, 3, s // 8, s // 8, generator=g) * 2 - 1  # smooth-ish images
        img = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)[0]
        return {
            "images": img.clamp(-1, 1),
            "text_ids": torch.randint(4, self.vocab, (self.text_length,), generator=g),
            "caption_ids": torch.randint(4, self.vocab, (self.caption_length,), generator=g),
            "noise_seeds": torch.tensor(self.seed * 7919 + i),
        }

    def __iter__(self):
        return self

    def __next__(self):
        start = self.consumed + (self.micro * self.d + self.r) * self.mb
        items = [self.sample(start + j) for j in range(self.mb)]
        self.micro += 1
        if self.micro == self.ga:
            self.micro = 0
            self.consumed += self.mb * self.d * self.ga
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def bad_counts(self) -> dict:
        return {}
