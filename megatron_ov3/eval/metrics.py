"""Evaluation metrics: reconstruction (PSNR, SSIM, LPIPS, FID), retrieval recall@K, zero-shot top-K.

Images are in [-1, 1] (the VAE's range); PSNR and SSIM use a data range of 2.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ..errors import UsageError

PSNR_CAP = 100.0
"""PSNR reported for identical images (MSE 0)."""


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,); capped at ``PSNR_CAP`` when the images are identical."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-300))
    return out.clamp(max=PSNR_CAP).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 3, device=None) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    g = torch.exp(-(g ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]
    return w.expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), (B,).
    Images smaller than the window use a window of their size."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size, 1.5, c, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x ** 2
    syy = F.conv2d(y * y, w, groups=c) - mu_y ** 2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets (N, D): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2). pytorch-fid's
    computation (``scipy.linalg.sqrtm`` of the D x D product); with fewer samples than features (a small
    evaluation: D = 2048) the same trace from the N x N eigenvalue problem, exact and seconds faster."""
    from scipy import linalg

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    if len(feats_a) < feats_a.shape[1]:  # fewer samples than features: S_a has rank < N, use the N x N form
        x = (feats_a - mu_a) / np.sqrt(len(feats_a) - 1)  # S_a = x^T x, so S_a S_b shares its nonzero
        eig = np.linalg.eigvalsh(x @ s_b @ x.T)  # eigenvalues with x S_b x^T (symmetric PSD, N x N)
        tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)
    covmean, _ = linalg.sqrtm(s_a.dot(s_b), disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + eps).dot(s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def inception_feature_extractor(weights_path: str, device=None, batch: int = 64):
    """The FID Inception-v3 (:mod:`megatron_ov3.eval.inception`, pytorch-fid's network and preprocessing) with
    the standard weights file; returns a callable mapping images in [-1, 1] (B, 3, H, W) to (B, 2048) float64
    numpy pool3 features."""
    from .inception import fid_inception

    net = fid_inception(weights_path).to(device or "cpu")

    def run(images: torch.Tensor) -> np.ndarray:
        x = ((images.detach().float().clamp(-1, 1) + 1) / 2).to(next(net.parameters()).device)
        with torch.no_grad():
            return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)]).double().cpu().numpy()

    return run


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Image->text and text->image recall@K where pair i matches i (embeddings are L2-normalised here). Ties
    count against the correct item (a collapsed tower scores chance, not 1.0); non-finite embeddings (a
    diverged model) give NaN."""
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        return {f"{name}_R@{k}": float("nan") for name in ("i2t", "t2i") for k in ks}
    a = F.normalize(image_emb.float(), dim=-1)
    b = F.normalize(text_emb.float(), dim=-1)
    sim = a @ b.t()
    n = sim.shape[0]
    target = torch.arange(n, device=sim.device)
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        # rank of the correct item = number of other items scored at least as high
        correct = s[target, target][:, None]
        rank = (s >= correct).sum(1) - 1
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out


def recall_chance(n: int, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@K of a random ranking over ``n`` pairs: K / n (the number to beat)."""
    return {f"{name}_R@{k}": min(1.0, k / n) for name in ("i2t", "t2i") for k in ks}


def zero_shot_chance(num_classes: int, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-K accuracy of a random guess among ``num_classes`` classes: K / C."""
    return {f"top{k}": min(1.0, k / num_classes) for k in ks}


def zero_shot_topk(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                   ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-K accuracy of classifying images by cosine similarity to per-class text embeddings, over the images
    that have a label (``labels >= 0``)."""
    keep = labels >= 0
    image_emb, labels = image_emb[keep], labels[keep]
    if labels.numel() == 0:
        raise UsageError("no image has a class label (.cls) for zero-shot classification")
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).t()
    out = {}
    for k in ks:
        k_ = min(k, sim.shape[1])
        top = sim.topk(k_, dim=1).indices
        out[f"top{k}"] = float((top == labels[:, None]).any(1).float().mean())
    return out


def image_grid(originals: torch.Tensor, recons, max_images: int = 16) -> torch.Tensor:
    """(3, H', W') uint8 grid: the first row the originals, each further row their reconstructions by one model
    (a tensor or a list of them, e.g. ``[VAE alone, OV3]``), image i in column i."""
    recons = [recons] if isinstance(recons, torch.Tensor) else list(recons)
    n = min(max_images, originals.shape[0])
    rows = [torch.cat(list(kind[:n]), dim=-1) for kind in [originals] + recons]
    grid = torch.cat(rows, dim=-2)
    return ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
