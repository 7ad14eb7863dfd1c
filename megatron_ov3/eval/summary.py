"""What the demo prints at the end: losses first -> last, the frozen VAE's own reconstruction next to OV3's (OV3
cannot beat its VAE; how close it gets is the point), retrieval and zero-shot with their chance levels, and the
paths of the pictures. Reads only files the demo wrote (metrics JSON lines, evaluate's report.json)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .curves import loss_keys

RETRIEVAL = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")


def _row(name: str, before: float, after: float, chance: Optional[float] = None) -> str:
    tail = f"   (chance {chance:.3f})" if chance is not None else ""
    return f"  {name:22s} {before:8.3f} -> {after:8.3f}{tail}"


def summarize(metrics: Sequence[dict], trained: Dict, untrained: Dict, vae_fit: Optional[Dict] = None,
              pictures: Sequence[str] = ()) -> str:
    first, last = metrics[0], metrics[-1]
    lines: List[str] = [f"losses, iteration {first['iteration']} -> {last['iteration']}:"]
    lines += [_row(k, first[k], last[k]) for k in loss_keys(metrics)]
    lines.append(f"\nreconstruction on {trained['num_images']} held-out images (PSNR dB / SSIM):")
    lines.append(f"  frozen VAE alone       {trained['vae_psnr']:8.2f} / {trained['vae_ssim']:.3f}")
    if vae_fit:
        lines.append(f"  (the VAE is a stand-in for FLUX.1: its structure at width {vae_fit['width']}, fitted to "
                     f"these images in {vae_fit['steps']} seeded steps)")
    lines.append(f"  OV3 untrained          {untrained['psnr']:8.2f} / {untrained['ssim']:.3f}")
    lines.append(f"  OV3 trained            {trained['psnr']:8.2f} / {trained['ssim']:.3f}"
                 f"   ({trained['psnr'] - trained['vae_psnr']:+.2f} dB from the VAE's own)")
    lines.append("\nunderstanding, untrained -> trained:")
    for k in RETRIEVAL:
        lines.append(_row(f"retrieval {k}", untrained[f"retrieval_{k}"], trained[f"retrieval_{k}"],
                          trained[f"chance_retrieval_{k}"]))
    if "zeroshot_top1" in trained:
        for k in ("top1", "top5"):
            lines.append(_row(f"zero-shot {k} ({trained['num_classes']} cl.)", untrained[f"zeroshot_{k}"],
                              trained[f"zeroshot_{k}"], trained[f"chance_zeroshot_{k}"]))
    lines += [f"\npicture: {p}" for p in pictures]
    return "\n".join(lines)


PAPER_COLUMNS = (("rFID", "rfid"), ("PSNR", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"),
                 ("zero-shot top-1", "zeroshot_top1"), ("I->T R@1", "retrieval_i2t_R@1"),
                 ("I->T R@5", "retrieval_i2t_R@5"), ("T->I R@1", "retrieval_t2i_R@1"),
                 ("T->I R@5", "retrieval_t2i_R@5"))


def _cell(value) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def paper_table(reports: Sequence[tuple]) -> str:
    """The paper's table from evaluate reports ``[(name, report.json dict), ...]``: a first row for the frozen VAE
    alone (its reconstruction columns, from the first report: the floor every OV3 row is read against), then one
    row per checkpoint. Columns a report lacks (no --lpips-path, no --inception-weights, no class labels) show —."""
    header = "| model | " + " | ".join(c for c, _ in PAPER_COLUMNS) + " | images |"
    lines = [header, "|---|" + "---:|" * (len(PAPER_COLUMNS) + 1)]
    first = reports[0][1]
    vae = [first.get("vae_" + k) if k in ("rfid", "psnr", "ssim", "lpips") else None for _, k in PAPER_COLUMNS]
    lines.append("| VAE (frozen, alone) | " + " | ".join(map(_cell, vae)) + f" | {first['num_images']} |")
    for name, rep in reports:
        cells = [rep.get(k) for _, k in PAPER_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(map(_cell, cells)) + f" | {rep['num_images']} |")
    return "\n".join(lines)
