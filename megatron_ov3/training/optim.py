"""The optimizer and its schedule: AdamW over the model's parameter groups, linear warmup + cosine decay."""
from __future__ import annotations

import math
from typing import Callable, List

import torch

from ..config.job import OptimConfig


def param_groups(model, weight_decay: float) -> List[dict]:
    """Two AdamW groups: decayed, and what the model exempts (``model.no_weight_decay(name, p)``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if model.no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(optim: OptimConfig, total_iters: int) -> Callable[[int], float]:
    """Multiplier of ``optim.lr`` at iteration ``it``: linear warmup, then cosine decay to ``min_lr``."""
    warm = optim.lr_warmup_iters
    floor = optim.min_lr / optim.lr

    def f(it):
        if warm and it < warm:
            return (it + 1) / warm
        progress = min(1.0, (it - warm) / max(1, total_iters - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model, optim: OptimConfig, total_iters: int, device: torch.device):
    """(torch AdamW, LambdaLR) for ``model``; fused AdamW on CUDA. DeepSpeed wraps both (ZeRO partitions the
    AdamW state); a torch optimizer avoids DeepSpeed's JIT-built CPU Adam."""
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                            betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
                            **({"fused": True} if device.type == "cuda" else {}))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_iters))
