"""Reading and writing image-text tar shards (img2dataset / webdataset layout).

A sample is a group of tar members sharing a key: ``KEY.jpg|jpeg|png|webp`` (image shards) or
``KEY.latent.npy`` (latent shards, fp16 (16, h, w), see tools/cache_latents.py), ``KEY.txt`` (caption) and an
optional ``KEY.json``. URLs use brace notation (``data/{000..099}.tar``); several sources are joined with ``::``.
"""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from typing import Dict, Iterator, List, Optional

import braceexpand
import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator
from ..errors import UsageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENT_EXT = "latent.npy"
LATENT_MANIFEST = "latent_cache.json"  # written by tools/cache_latents.py beside latent shards: a latent source


def expand_urls(spec: str) -> List[List[str]]:
    """``"a/{0..3}.tar::b/*.tar"`` -> one list of shard paths per source (brace and glob expansion)."""
    sources = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        paths: List[str] = []
        for p in braceexpand.braceexpand(part):
            matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            paths.extend(matches)
        sources.append(paths)
    if not sources:
        raise UsageError(f"data path {spec!r} names no shards; give e.g. 'shards/{{00000..00009}}.tar'")
    return sources


def shard_name(url: str) -> str:
    """The name a shard's samples are seeded by: its file name, however the shard is reached (``x/a.tar``,
    ``file:///x/a.tar``, ``https://host/x/a.tar?sig=..``, ``pipe:aws s3 cp s3://b/x/a.tar -``). Seeds (decoder
    noise, augmentation) then do not depend on where the shards live, so the same shards give the same run
    from any folder or store."""
    if url.startswith("pipe:"):
        tars = [t for t in url[5:].split() if ".tar" in t]
        url = tars[-1] if tars else url[5:].strip()
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def expected_count(path: str, _cache: Dict[str, Dict[str, int]] = {}) -> Optional[int]:
    """How many samples shard ``path`` holds, when its writer said so: ``sizes.json`` in its folder (our tools,
    webdataset's ``tarp``/``ShardWriter`` convention) or img2dataset's ``NAME_stats.json`` (``successes``)."""
    folder, name = os.path.split(path)
    if folder not in _cache:
        try:
            with open(os.path.join(folder, "sizes.json")) as f:
                _cache[folder] = {k: int(v) for k, v in json.load(f).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            _cache[folder] = {}
    if name in _cache[folder]:
        return _cache[folder][name]
    try:
        with open(os.path.join(folder, name.rsplit(".", 1)[0] + "_stats.json")) as f:
            return int(json.load(f)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _has_end_marker(path: str) -> bool:
    """Whether a tar ends with its end-of-archive marker (two zero 512-byte blocks, which every tar writer puts
    there): a shard cut exactly between two members reads as complete to ``tarfile`` but lacks it."""
    size = os.path.getsize(path)
    if size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def iter_tar_samples(path: str, on_error) -> Iterator[Dict[str, bytes]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one tar. Damage costs only what is damaged:

    * a member repeated within a sample: ``on_error("duplicate_member", path, exc)``; the sample keeps its first
      copy and the shard goes on (webdataset's grouping would raise and drop the rest of the shard);
    * a missing/unreadable/truncated shard (a cut between two members too: no end-of-archive marker):
      ``on_error("bad_shard", path, exc)`` once and the shard ends (samples before the damage are kept); when
      the shard's size is recorded (:func:`expected_count`), the samples it
      lost are counted too: ``on_error("lost_sample", path, exc, n)``."""
    n, expected = 0, expected_count(path)

    def duplicates(exc):
        if isinstance(exc, ValueError) and "duplicate file name" in str(exc.args[0] if exc.args else ""):
            on_error("duplicate_member", path, exc)
            return True
        raise exc

    try:
        with open(path, "rb") as stream:
            members = tar_file_iterator(stream)
            for sample in group_by_keys(({**m, "__url__": path} for m in members), handler=duplicates):
                n += 1
                yield sample
        if expected is not None and n < expected:  # cut at a member boundary: tarfile sees a normal end
            raise EOFError(f"{path} ends after {n} of its {expected} samples")
        if not _has_end_marker(path):
            raise EOFError(f"{path} has no end-of-archive blocks (cut at a member boundary)")
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        on_error("bad_shard", path, e)
        if expected is not None and expected > n:
            on_error("lost_sample", path, e, expected - n)


def sample_kind(sample: Dict) -> Optional[str]:
    """'latent', 'image' or None (no usable payload)."""
    if LATENT_EXT in sample:
        return "latent"
    if any(e in sample for e in IMAGE_EXTS):
        return "image"
    return None


def image_bytes(sample: Dict) -> Optional[bytes]:
    for e in IMAGE_EXTS:
        if e in sample:
            return sample[e]
    return None


def _json_object(sample: Dict) -> Optional[dict]:
    """``KEY.json`` as a dict; None when absent, not JSON, or JSON of another kind (a list, a number): such a
    sample is counted as caption-less by the caller, never fatal."""
    if "json" not in sample:
        return None
    try:
        meta = json.loads(sample["json"])
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def caption_of(sample: Dict) -> Optional[str]:
    """Caption from ``.txt``, else ``caption``/``text`` in ``.json``; None when absent."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace")
    meta = _json_object(sample) or {}
    for k in ("caption", "text"):
        if isinstance(meta.get(k), str):
            return meta[k]
    return None


RECAPTION_KEY = "re_caption"  # Recap-DataComp-1B's recaption column, kept in KEY.json by img2dataset


def recaption_of(sample: Dict, key: str = RECAPTION_KEY) -> Optional[str]:
    """The second caption of a two-caption sample: field ``key`` of ``KEY.json`` (img2dataset writes the
    parquet's extra columns there); None when absent or empty."""
    value = (_json_object(sample) or {}).get(key)
    return value.strip() if isinstance(value, str) and value.strip() else None


def encode_latent(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, latent.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


def decode_latent(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardWriter:
    """Writes numbered tar shards ``{prefix}-{i:05d}.tar`` of at most ``samples_per_shard`` samples each, plus
    ``sizes.json`` (shard name -> sample count). Each shard is written to ``.tmp`` and renamed when complete,
    so an interrupted run never leaves a truncated shard under a final name."""

    def __init__(self, out_dir: str, samples_per_shard: int = 1000, prefix: str = "shard", start_index: int = 0,
                 name: Optional[str] = None, record_sizes: bool = True):
        """``name``: write exactly one shard with this file name (no size limit; created even when empty).
        ``record_sizes``: merge the counts into ``sizes.json`` on close (off when processes write in parallel)."""
        if samples_per_shard < 1:
            raise UsageError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.per_shard, self.prefix = out_dir, samples_per_shard, prefix
        self.index = start_index
        self.sizes: Dict[str, int] = {}
        self.fixed_name, self.record_sizes = name, record_sizes
        if name is not None:
            self.per_shard = float("inf")
        self._tar = None
        self._count = 0

    def _open(self):
        name = self.fixed_name or f"{self.prefix}-{self.index:05d}.tar"
        self._name = name
        self._tmp = os.path.join(self.out_dir, name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w")
        self._count = 0

    def _close(self):
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, os.path.join(self.out_dir, self._name))
        self.sizes[self._name] = self._count
        self._tar = None
        self.index += 1

    def write(self, key: str, files: Dict[str, bytes]) -> None:
        if self._tar is None:
            self._open()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.per_shard:
            self._close()

    def close(self) -> Dict[str, int]:
        if self.fixed_name is not None and self._tar is None and not self.sizes:
            self._open()  # a named shard exists even when no sample survived
        self._close()
        if not self.record_sizes:
            return self.sizes
        path = os.path.join(self.out_dir, "sizes.json")
        sizes = {}
        if os.path.exists(path):
            with open(path) as f:
                sizes = json.load(f)
        sizes.update(self.sizes)
        with open(path + ".tmp", "w") as f:
            json.dump(sizes, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)
        return self.sizes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._tar is not None:  # leave no partial shard behind
            self._tar.close()
            os.remove(self._tmp)
