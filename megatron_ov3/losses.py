"""OV3 losses: CLIP contrastive over the data-parallel group, L1 reconstruction terms.

Contrastive loss (open_clip ``ClipLoss`` with ``local_loss=True, gather_with_grad=True``): each rank gathers
the image and text embeddings of its whole **data-parallel group** (never the tensor- or pipeline-parallel
group: those ranks hold copies of the same samples), scores its own B rows against all G*B columns and
averages the image->text and text->image cross-entropies of its rows. The gather keeps the autograd graph:
its backward sums every rank's gradient for this rank's embeddings. After the usual data-parallel gradient
averaging, the update equals the gradient of the *global* loss over the concatenated batch
(``tests/distributed/test_contrastive.py`` checks loss and gradients against one process within 1e-6).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the gradient and returns this rank's slice.

    Written out instead of torch.distributed.nn.all_gather so the same code path runs on gloo (CPU) and NCCL.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: torch.Tensor, group) -> Tuple[torch.Tensor, int]:
    """Concatenate ``x`` over ``group`` (rank order) keeping gradients; returns (all, offset of this rank)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x, 0
    return _GatherWithGrad.apply(x, group), dist.get_rank(group) * x.shape[0]


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, group=None):
    """Symmetric CLIP loss with local loss + gather-with-grad over ``group`` (the data-parallel group).

    Inputs are unnormalised embeddings (B, E); ``logit_scale`` is the (already exponentiated, clamped) scale.
    Returns ``(loss, image_to_text_accuracy, text_to_image_accuracy)`` for this rank's rows.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    all_img, offset = gather_with_grad(img, group)
    all_txt, _ = gather_with_grad(txt, group)
    labels = torch.arange(img.shape[0], device=img.device) + offset
    logits_i2t = logit_scale * img @ all_txt.t()
    logits_t2i = logit_scale * txt @ all_img.t()
    loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    with torch.no_grad():
        acc_i2t = (logits_i2t.argmax(dim=1) == labels).float().mean()
        acc_t2i = (logits_t2i.argmax(dim=1) == labels).float().mean()
    return loss, acc_i2t, acc_t2i


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in fp32."""
    return (pred.float() - target.float()).abs().mean()
