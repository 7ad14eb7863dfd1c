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

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


CONTRASTIVE_TEXTS = ("alt", "recap-sentence", "alt-or-recap-sentence")
"""What a contrastive text can be (``OV3Config.contrastive_texts`` documents each; the data draws them)."""
TEXT_KEYS = ("text_ids", "text_ids_2")
"""Batch entries of the contrastive texts, in ``--contrastive-texts`` order (the data writes them, the model reads
them): one text tower pass and one contrastive loss each, averaged."""


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


@dataclass
class EmbeddingPool:
    """The contrastive embeddings of every micro-batch of one accumulation window, computed without gradients
    before the window's forward/backward passes (open_clip's ``--accum-freq``), so each micro-batch's loss sees
    the whole global batch: its own rows recomputed with gradients, the other micro-batches' rows from here."""

    images: torch.Tensor
    """(A*B, E) image embeddings of this rank's A micro-batches of B samples, in window order."""
    texts: List[torch.Tensor]
    """Per contrastive text (``--contrastive-texts``), (A*B, E) text embeddings in the same order."""
    rows: int
    """B, the samples of one micro-batch."""
    index: int = 0
    """The micro-batch (0..A-1) whose forward reads the pool now."""

    @property
    def micro_batches(self) -> int:
        return self.images.shape[0] // self.rows

    def at(self, index: int) -> "EmbeddingPool":
        return EmbeddingPool(self.images, self.texts, self.rows, index)

    def replaced(self, index: int, slot) -> "EmbeddingPool":
        """A copy with micro-batch ``index``'s rows taken from ``slot`` (a new micro-batch's pool pass)."""
        rows = slice(index * self.rows, (index + 1) * self.rows)
        images, texts = self.images.clone(), [t.clone() for t in self.texts]
        images[rows] = slot["image"]
        for i, t in enumerate(texts):
            t[rows] = slot[f"text{i}"]
        return EmbeddingPool(images, texts, self.rows, self.index)

    def with_own(self, pooled: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """``pooled`` with this micro-batch's rows replaced by ``own`` (which carries the gradient)."""
        if own.shape[0] != self.rows:
            raise ValueError(f"micro-batch of {own.shape[0]} rows in a pool of micro-batches of {self.rows}")
        start = self.index * self.rows
        return torch.cat([pooled[:start].to(own.dtype), own, pooled[start + self.rows:].to(own.dtype)])


def pooled_contrastive_loss(image_emb: torch.Tensor, text_embs: List[torch.Tensor], logit_scale: torch.Tensor,
                            pool: "EmbeddingPool | None", group=None):
    """The contrastive loss of one micro-batch: averaged over the contrastive texts, and with a ``pool`` over the
    whole accumulation window.

    With a pool of A micro-batches the value is the loss of the window's A*B rows (gathered over ``group`` as
    without one), and the gradient is scaled so that after DeepSpeed divides each micro-batch's loss by A and
    sums the A backward passes, every parameter's gradient equals that of one pass over the A*B rows: A x the
    gradient through this micro-batch's own embeddings (the only ones that carry one), and the logit scale's
    own gradient (which every micro-batch's loss carries whole) 1/A of that.
    Returns ``(loss, image_to_text_accuracy, text_to_image_accuracy)``, the accuracies of the first text."""
    a = pool.micro_batches if pool is not None else 1
    if a > 1:
        logit_scale = logit_scale.detach() + (logit_scale - logit_scale.detach()) / a  # value unchanged
        image_emb = pool.with_own(pool.images, image_emb)
        text_embs = [pool.with_own(p, t) for p, t in zip(pool.texts, text_embs)]
    losses, accs = [], None
    for txt in text_embs:
        loss, acc_i2t, acc_t2i = contrastive_loss(image_emb, txt, logit_scale, group)
        losses.append(loss)
        accs = accs or (acc_i2t, acc_t2i)
    loss = torch.stack(losses).mean()
    if a > 1:
        loss = loss.detach() + a * (loss - loss.detach())  # value unchanged, gradient x A
    return loss, accs[0], accs[1]


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in fp32."""
    return (pred.float() - target.float()).abs().mean()
