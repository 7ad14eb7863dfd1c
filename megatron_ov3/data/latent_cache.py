"""Run the frozen VAE once over image shards and write latent shards (fp16 latents + caption).

Output shards keep the input shard names, are written atomically (``.tmp`` then rename) and are skipped when
already present, so an interrupted run resumes where it stopped. Several processes (``rank``/``world``, e.g.
one per GPU via torchrun) take disjoint shards (every world-th). Training detects latent shards by their
``.latent.npy`` members and then skips the VAE encoder.

The output folder also gets ``latent_cache.json`` (resolution and the VAE's latent normalisation): a folder
never mixes two normalisations, and training refuses latent shards whose normalisation differs from its VAE's
(:func:`check_latent_normalisation`), which would otherwise train silently on shifted targets.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List

import torch

from .pipeline import decode_image
from .shards import LATENT_MANIFEST, ShardWriter, caption_of, encode_latent, expand_urls, image_bytes, iter_tar_samples
from ..errors import MissingFile, UsageError


def cache_latents(data_path: str, out_dir: str, vae, image_size: int, batch_size: int = 32, rank: int = 0,
                  world: int = 1, device: str = "cpu", progress: bool = True) -> Dict:
    from tqdm import tqdm

    shards: List[str] = [u for src in expand_urls(data_path) for u in src]
    for u in shards:
        if not os.path.isfile(u):
            raise MissingFile(f"input shard {u!r} does not exist")
    names = [os.path.basename(u) for u in shards]
    if len(set(names)) != len(names):
        raise UsageError("input shards from different folders share file names; cache each source separately")
    os.makedirs(out_dir, exist_ok=True)
    _record_normalisation(out_dir, vae, image_size)
    mine = shards[rank::world]
    stats: Counter = Counter()
    vae = vae.to(device)
    for url in tqdm(mine, desc=f"latents[rank {rank}]", unit="shard", disable=not progress):
        name = os.path.basename(url)
        if os.path.exists(os.path.join(out_dir, name)):
            stats["shards_skipped_existing"] += 1
            continue
        with ShardWriter(out_dir, name=name, record_sizes=False) as writer:
            pending = []

            def flush():
                if not pending:
                    return
                imgs = torch.stack([p[1] for p in pending]).to(device)
                with torch.no_grad():
                    lat = vae.encode(imgs).cpu().numpy()
                for (key, _, cap), z in zip(pending, lat):
                    writer.write(key, {"latent.npy": encode_latent(z), "txt": cap.encode()})
                stats["samples"] += len(pending)
                pending.clear()

            for smp in iter_tar_samples(url, lambda *a: stats.update({a[0]: a[3] if len(a) > 3 else 1})):
                data, cap = image_bytes(smp), caption_of(smp)
                if data is None:
                    stats["missing_image"] += 1
                    continue
                if cap is None or not cap.strip():
                    stats["missing_or_empty_caption"] += 1
                    continue
                img = decode_image(data, image_size)
                if img is None:
                    stats["bad_image"] += 1
                    continue
                pending.append((smp["__key__"], img, cap.strip()))
                if len(pending) == batch_size:
                    flush()
            flush()
        stats["shards_written"] += 1
    return dict(stats)


MANIFEST = LATENT_MANIFEST


def _manifest(vae, image_size: int) -> dict:
    return {"image_size": int(image_size), "scaling_factor": float(vae.scaling_factor),
            "shift_factor": float(vae.shift_factor)}


_FLAGS = (("shift_factor", "--vae-shift-factor"), ("scaling_factor", "--vae-scaling-factor"),
          ("image_size", "--image-size"))


def _difference(have: dict, mine: dict):
    """(key, flag) of the first manifest entry that differs, or None."""
    return next(((k, f) for k, f in _FLAGS if abs(float(have[k]) - float(mine[k])) > 1e-9), None)


def _record_normalisation(out_dir: str, vae, image_size: int) -> None:
    path = os.path.join(out_dir, MANIFEST)
    mine = _manifest(vae, image_size)
    if os.path.isfile(path):
        have = json.load(open(path))
        if _difference(have, mine):
            raise UsageError(f"{out_dir!r} already holds latents made with {have}, this run would add {mine}; "
                             f"use another --output-dir")
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(mine, f)
    os.replace(tmp, path)


def check_latent_normalisation(data_path: str, vae, image_size: int) -> None:
    """Raise ValueError when a shard folder of ``data_path`` has a latent-cache manifest that disagrees with
    ``vae``'s normalisation or with ``image_size``."""
    mine = _manifest(vae, image_size)
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for src in expand_urls(data_path) for u in src}):
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            continue
        have = json.load(open(path))
        diff = _difference(have, mine)
        if diff:
            key, flag = diff
            raise UsageError(f"latent shards in {folder} were cached with {key}={have[key]}, this run uses "
                             f"{mine[key]}; set {flag} {have[key]} or re-run tools/cache_latents.py")
