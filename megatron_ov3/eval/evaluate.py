"""Evaluation of an OV3 model on held-out shards, data-parallel over processes.

Reconstruction (PSNR, SSIM, LPIPS, rFID through the exported path: VAE encode -> encoder -> decoder -> VAE
decode, no noise), zero-shot retrieval recall@1/5/10 over the held-out pairs, zero-shot classification top-1/5
when samples carry a label (``KEY.cls``) and class names are given, and a picture grid of originals next to
reconstructions. Each rank evaluates its share of the shards; rank 0 gathers and reports.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import metrics as M
from .classes import SIMPLE_TEMPLATES, check_labels
from ..errors import UsageError


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device,
                     batch: int = 1024) -> torch.Tensor:
    """Per class: the normalised mean of the normalised text embeddings of its prompts (CLIP's zero-shot recipe).
    All prompts are encoded in batches of ``batch`` (1000 classes x 80 templates: 79 forward passes)."""
    length = model.cfg.text_context_length
    ids = torch.from_numpy(np.stack([tokenizer.encode(t.format(name), length) for name in classnames
                                     for t in templates]))
    emb = torch.cat([F.normalize(model.encode_text(ids[i:i + batch].to(device)).float(), dim=-1).cpu()
                     for i in range(0, len(ids), batch)])
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def evaluate(model, batches, device, tokenizer=None, classnames: Optional[Sequence[str]] = None,
             templates: Sequence[str] = SIMPLE_TEMPLATES, lpips=None, inception=None,
             max_batches: Optional[int] = None,
             group=None, grid_images: int = 8) -> Dict:
    """Metrics over ``batches`` (this rank's share), gathered over ``group``. Returns the report on every rank."""
    was_training = model.training
    model.eval()
    acc: Dict[str, List[torch.Tensor]] = {k: [] for k in ("psnr", "ssim", "lpips", "vae_psnr", "vae_ssim",
                                                          "vae_lpips", "img", "txt", "labels", "feats_real",
                                                          "feats_fake", "feats_vae")}
    grid = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if "images" not in batch:
            raise UsageError("evaluation needs image shards (reconstruction is measured in pixels)")
        x = batch["images"]
        z = model.latents_of({"images": x})  # encoded once, for OV3 and for the VAE on its own
        enc = model.encode_image(latents=z)
        z_hat = model.predict_latents(enc.tokens)
        x_hat = model.vae.decode(z_hat).clamp(-1, 1)
        x_vae = model.vae.decode(z).clamp(-1, 1)  # the ceiling: the frozen VAE on its own
        acc["psnr"].append(M.psnr(x_hat, x).cpu())
        acc["ssim"].append(M.ssim(x_hat, x).cpu())
        acc["vae_psnr"].append(M.psnr(x_vae, x).cpu())
        acc["vae_ssim"].append(M.ssim(x_vae, x).cpu())
        if lpips is not None:
            acc["lpips"].append(lpips(x_hat.float(), x.float()).cpu())
            acc["vae_lpips"].append(lpips(x_vae.float(), x.float()).cpu())
        if inception is not None:
            for key, images in (("feats_real", x), ("feats_fake", x_hat), ("feats_vae", x_vae)):
                acc[key].append(torch.from_numpy(inception(images)))
        acc["img"].append(enc.embedding.float().cpu())
        acc["txt"].append(model.encode_text(batch["text_ids"]).float().cpu())
        # one label per image (-1: none), so the labels stay aligned when only some shards carry .cls
        acc["labels"].append(batch["labels"].cpu() if "labels" in batch else torch.full((x.shape[0],), -1))
        if grid is None:
            grid = M.image_grid(x, [x_vae, x_hat], grid_images)
    local = {k: (torch.cat(v) if v else None) for k, v in acc.items()}
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
        merged = {k: [p[k] for p in parts if p[k] is not None] for k in local}
        local = {k: (torch.cat(v) if v else None) for k, v in merged.items()}
    report: Dict = {"num_images": int(local["psnr"].numel()) if local["psnr"] is not None else 0}
    if report["num_images"] == 0:
        raise UsageError("the evaluation data yielded no image")
    for k in ("psnr", "ssim", "vae_psnr", "vae_ssim"):
        report[k] = float(local[k].mean())
    for k in ("lpips", "vae_lpips"):
        if local[k] is not None:
            report[k] = float(local[k].mean())
    if local["feats_real"] is not None:  # rFID of OV3's reconstructions and, the floor, of the VAE's own
        report["rfid"] = M.frechet_distance(local["feats_real"].numpy(), local["feats_fake"].numpy())
        report["vae_rfid"] = M.frechet_distance(local["feats_real"].numpy(), local["feats_vae"].numpy())
    report.update({f"retrieval_{k}": v for k, v in M.recall_at_k(local["img"], local["txt"]).items()})
    report.update({f"chance_retrieval_{k}": v for k, v in M.recall_chance(report["num_images"]).items()})
    if local["labels"] is not None and not (local["labels"] >= 0).any():
        local["labels"] = None
    if classnames and local["labels"] is not None and tokenizer is not None:
        check_labels(local["labels"].tolist(), len(classnames))
        cls = class_embeddings(model, tokenizer, classnames, templates, device).cpu()
        report.update({f"zeroshot_{k}": v for k, v in M.zero_shot_topk(local["img"], cls, local["labels"]).items()})
        report["num_classes"] = len(classnames)
        report.update({f"chance_zeroshot_{k}": v for k, v in M.zero_shot_chance(len(classnames)).items()})
    if was_training:
        model.train()
    return {"report": report, "grid": grid}


def format_table(report: Dict) -> str:
    w = max(len(k) for k in report)
    return "\n".join(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}" for k, v in report.items())


GRID_ROWS = ("input", "VAE alone", "OV3")


def save_grid(grid: torch.Tensor, path: str, labels=GRID_ROWS, min_tile: int = 160) -> None:
    """The :func:`~megatron_ov3.eval.metrics.image_grid` as a PNG a person can read: each tile upscaled (nearest,
    so pixels stay pixels) to at least ``min_tile`` pixels, and each row named at its left."""
    from PIL import Image, ImageDraw, ImageFont

    rows = len(labels)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    tile = img.height // rows
    scale = max(1, -(-min_tile // tile))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=max(12, tile * scale // 8))
    margin = int(max(draw_len for draw_len in (font.getlength(t) for t in labels))) + 16
    out = Image.new("RGB", (img.width + margin, img.height), "white")
    out.paste(img, (margin, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        draw.text((8, i * tile * scale + tile * scale // 2), text, fill="black", font=font, anchor="lm")
    out.save(path)
