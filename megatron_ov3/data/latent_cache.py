"""Run the frozen VAE once over image shards and write latent shards (fp16 latents + caption).

Output shards keep the input shard names, are written atomically (``.tmp`` then rename) and are skipped when
already present, so an interrupted run resumes where it stopped. Several processes (``rank``/``world``, e.g.
one per GPU via torchrun) take disjoint shards (every world-th). Training detects latent shards by their
``.latent.npy`` members and then skips the VAE encoder.

The output folder also gets ``latent_cache.json`` (resolution, the VAE's latent normalisation and the
augmentation): a folder never mixes two settings, and training refuses latent shards whose normalisation
differs from its VAE's (:func:`check_latent_normalisation`), which would otherwise train silently on shifted
targets.

Augmentation and caching: a latent cannot be augmented after encoding (the colour jitter acts on pixels, and a
crop of the latent is not the latent of the crop), so ``views`` > 0 caches that many augmented views per image
(each seeded by the shard, key and view; ``KEY.latent.npy`` is then (views, 16, h, w)) and training draws one
view per sample and epoch. A centre-crop cache (``views`` 0) trains only with ``--no-augment``, a cache of views
only with augmentation on; both are checked here, before training.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, List, Optional

import torch

from .images import Augment, decode_image
from .pipeline import seeded_rng
from .shards import (LATENT_MANIFEST, ShardWriter, caption_of, encode_latent, expand_urls, image_bytes,
                     iter_tar_samples, shard_name)
from ..errors import MissingFile, UsageError


def input_shards(data_path: str) -> List[str]:
    """The shards of ``data_path``, each checked to exist and be a tar file (a usage error otherwise), before
    anything is written."""
    import tarfile

    shards: List[str] = [u for src in expand_urls(data_path) for u in src]
    for u in shards:
        if not os.path.isfile(u):
            raise MissingFile(f"input shard {u!r} does not exist")
        if not tarfile.is_tarfile(u):
            raise UsageError(f"input shard {u!r} is not a tar file; give webdataset tar shards "
                             f"(tools/make_shards.py makes them from images and captions)")
    names = [os.path.basename(u) for u in shards]
    if len(set(names)) != len(names):
        raise UsageError("input shards from different folders share file names; cache each source separately")
    return shards


def cache_latents(data_path: str, out_dir: str, vae, image_size: int, batch_size: int = 32, rank: int = 0,
                  world: int = 1, device: str = "cpu", progress: bool = True, views: int = 0,
                  aug: Optional[Augment] = None, seed: int = 1234) -> Dict:
    """Encode every image of ``data_path`` (this rank's shards) into ``out_dir``; ``views`` > 0 with ``aug``:
    that many augmented views per image instead of the centre crop. ``KEY.txt`` and ``KEY.json`` are kept (the
    recaption of two-caption data lives in the JSON)."""
    from tqdm import tqdm

    if views < 0 or (views > 0) != (aug is not None):
        raise UsageError("augmented views need an augmentation (and an augmentation needs --augment-views >= 1)")
    shards = input_shards(data_path)
    os.makedirs(out_dir, exist_ok=True)
    _record_normalisation(out_dir, vae, image_size, views, aug)
    mine = shards[rank::world]
    stats: Counter = Counter()
    vae = vae.to(device)
    for url in tqdm(mine, desc=f"latents[rank {rank}]", unit="shard", disable=not progress):
        name = shard_name(url)
        if os.path.exists(os.path.join(out_dir, name)):
            stats["shards_skipped_existing"] += 1
            continue
        with ShardWriter(out_dir, name=name, record_sizes=False) as writer:
            _encode_shard(url, writer, vae, image_size, batch_size, device, stats, views, aug, seed)
        stats["shards_written"] += 1
    return dict(stats)


def _encode_shard(url, writer, vae, image_size, batch_size, device, stats, views, aug, seed) -> None:
    pending = []

    def flush():
        if not pending:
            return
        imgs = torch.stack([img for p in pending for img in p[1]]).to(device)
        with torch.no_grad():
            lat = vae.encode(imgs).cpu().numpy()
        per = max(1, views)
        for i, (key, _, files) in enumerate(pending):
            z = lat[i * per:(i + 1) * per]
            writer.write(key, {"latent.npy": encode_latent(z if views else z[0]), **files})
        stats["samples"] += len(pending)
        pending.clear()

    name = shard_name(url)
    for smp in iter_tar_samples(url, lambda *a: stats.update({a[0]: a[3] if len(a) > 3 else 1})):
        data, cap = image_bytes(smp), caption_of(smp)
        if data is None:
            stats["missing_image"] += 1
            continue
        if cap is None or not cap.strip():
            stats["missing_or_empty_caption"] += 1
            continue
        imgs = [decode_image(data, image_size, aug, seeded_rng(seed, "cache-view", name, smp["__key__"], v))
                for v in range(views)] if views else [decode_image(data, image_size)]
        if any(img is None for img in imgs):
            stats["bad_image"] += 1
            continue
        files = {"txt": cap.strip().encode(), **({"json": smp["json"]} if "json" in smp else {})}
        pending.append((smp["__key__"], imgs, files))
        if len(pending) * max(1, views) >= batch_size:
            flush()
    flush()


MANIFEST = LATENT_MANIFEST


def _manifest(vae, image_size: int, views: int = 0, aug: Optional[Augment] = None) -> dict:
    out = {"image_size": int(image_size), "scaling_factor": float(vae.scaling_factor),
           "shift_factor": float(vae.shift_factor)}
    if views:
        out.update(views=int(views), augmentation=aug.describe())
    return out


_FLAGS = (("shift_factor", "--vae-shift-factor"), ("scaling_factor", "--vae-scaling-factor"),
          ("image_size", "--image-size"))


def _difference(have: dict, mine: dict):
    """(key, flag) of the first manifest entry that differs, or None."""
    return next(((k, f) for k, f in _FLAGS if abs(float(have[k]) - float(mine[k])) > 1e-9), None)


def _record_normalisation(out_dir: str, vae, image_size: int, views: int = 0,
                          aug: Optional[Augment] = None) -> None:
    path = os.path.join(out_dir, MANIFEST)
    mine = _manifest(vae, image_size, views, aug)
    if os.path.isfile(path):
        have = json.load(open(path))
        if _difference(have, mine) or have.get("views", 0) != mine.get("views", 0) or \
                have.get("augmentation") != mine.get("augmentation"):
            raise UsageError(f"{out_dir!r} already holds latents made with {have}, this run would add {mine}; "
                             f"use another --output-dir")
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(mine, f)
    os.replace(tmp, path)


def check_latent_normalisation(data_path: str, vae, image_size: int, aug: Optional[Augment] = None) -> None:
    """Raise :class:`UsageError` when a shard folder of ``data_path`` has a latent-cache manifest that disagrees
    with ``vae``'s normalisation, with ``image_size``, or with the training augmentation ``aug``."""
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
        _check_views(folder, have, aug)


def _check_views(folder: str, have: dict, aug: Optional[Augment]) -> None:
    views = int(have.get("views", 0))
    if views == 0 and aug is not None:
        raise UsageError(f"latent shards in {folder} were cached from centre crops, and a latent cannot be "
                         f"augmented after encoding; train with --no-augment, or re-cache augmented views with "
                         f"tools/cache_latents.py --augment-views N")
    if views and aug is None:
        raise UsageError(f"latent shards in {folder} hold {views} augmented views per image; train with "
                         f"augmentation on (drop --no-augment) or re-cache without --augment-views")
    if views and have.get("augmentation") != aug.describe():
        raise UsageError(f"latent shards in {folder} were cached with augmentation {have.get('augmentation')}, "
                         f"this run uses {aug.describe()}; set --crop-min-area/--color-jitter/--grayscale-prob "
                         f"to the cache's values or re-cache")
