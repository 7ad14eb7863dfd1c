"""The training data pipeline: tar shards -> shuffled, decoded, tokenized micro-batches; exactly resumable.

Determinism and splitting
    For source s and epoch e the shard list is permuted with (seed, s, e); data-parallel rank r of R with
    loader worker w of W reads every (R*W)-th shard starting at r*W + w. Tensor- and pipeline-parallel ranks of
    one replica share the data-parallel rank, so they read identical batches. With ``resample`` each worker
    instead draws shards with replacement from its own seeded RNG (no coverage guarantee, no epochs).
    Several sources (``a::b``) are mixed per sample by a seeded weighted choice. A shuffle buffer (seeded per
    rank and worker) reorders raw samples; decoding happens after it.

Exact resume without re-decoding
    Workers carry a *raw position* (raw samples drawn from the shuffle buffer, good or bad) with every batch;
    the loader records the last one per worker together with the number of batches consumed. Resuming
    replays each worker's raw stream (tar reads and buffer shuffles only) past its recorded position, then
    decodes from there; worker roles are rotated so the first batch comes from the worker that was next.

Bad data
    Unreadable shards, undecodable/truncated images, images over ``--max-image-pixels``, missing or empty
    captions, bad latents are skipped and counted per reason; a truncated shard also counts the samples it lost
    (when its size is recorded), a duplicated tar member costs only itself. Whether a source holds images or
    latents is decided per source, before reading (``latent_cache.json`` beside its shards: latents; else
    images), so a stray sample of the other kind is one ``wrong_kind``. The counts travel with the batches and
    are reported by the training log.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import MissingFile, UsageError
from ..losses import CONTRASTIVE_TEXTS, TEXT_KEYS
from ..options import check_numbers, cli
from .images import TOO_LARGE, Augment, decode_image, to_rgb  # noqa: F401 (decode_image, to_rgb: public here)
from .shards import (LATENT_MANIFEST, RECAPTION_KEY, caption_of, decode_latent, expand_urls, image_bytes, is_local,
                     iter_tar_samples, local_path, recaption_of, sample_kind, shard_name)

REASONS = ("bad_shard", "bad_image", "missing_image", "missing_caption", "empty_caption", "bad_latent", "wrong_kind",
           "duplicate_member", "lost_sample", "too_large", "shard_retry")
NOT_SAMPLES = ("shard_retry",)
"""Counted events that lose no sample (a remote shard's transfer retried): not in the bad-sample total."""
UNUSABLE_STREAK = 2000  # raw samples in a row without a usable one: the source holds nothing to train on


@dataclass
class DataConfig:
    """Where the data is and how it becomes batches. Fields marked ``cli`` are flags; the others (batch size,
    resolution, text lengths, seed) are filled from the rest of the job configuration."""

    data_path: Optional[str] = field(default=None, metadata=cli())
    """Shard URLs, brace notation, several sources joined with '::' (e.g. 'a/{000..099}.tar::b/{00..09}.tar')."""
    tokenizer: Optional[str] = field(default=None, metadata=cli())
    """Path of the sentencepiece model (tools/train_tokenizer.py)."""
    mock_data: bool = field(default=False, metadata=cli())
    """Deterministic synthetic batches indexed by global sample, layout-independent (tests, benchmarks)."""
    data_weights: Optional[List[float]] = field(default=None, metadata=cli(low=0, low_open=True))
    """Sampling weight per source (default: equal)."""
    resample: bool = field(default=False, metadata=cli("--data-resample"))
    """Draw shards with replacement (infinite, no epochs) instead of epoch-wise disjoint splitting."""
    shard_retries: int = field(default=3, metadata=cli(low=0))
    """Attempts after the first at a remote shard whose transfer fails (a command's non-zero exit, a dropped
    connection), skipping the samples already read; counted as ``shard_retry``. Local files are never retried."""
    shard_retry_backoff_s: float = field(default=1.0, metadata=cli(low=0))
    """Wait before retry k: this x 2^(k-1) seconds."""
    data_streams: Optional[int] = field(default=None, metadata=cli(low=1))
    """Virtual streams the training data is dealt into (megatron_ov3/data/elastic.py): the global batches are then
    the same samples at any data-parallel size and worker count, and a checkpoint resumes exactly on another
    layout. It must divide the global batch, be a multiple of the data-parallel size and not exceed the shard count;
    default: the largest such divisor of the global batch up to 1024 (never a function of the layout)."""
    num_workers: int = field(default=2, metadata=cli())
    """DataLoader worker processes per rank (0: load in the main process)."""
    shuffle_buffer: int = field(default=1000, metadata=cli())
    """Samples held by the shuffle buffer of each worker (0 or 1: no shuffling)."""
    micro_batch_size: int = 8
    """Samples per batch on one data-parallel rank."""
    image_size: int = 256
    """Resolution of the current stage; images are resized (shorter side) and cropped to it."""
    epochs: Optional[int] = None
    """Stop after this many passes over the data (None: endless, as for training by iterations)."""
    drop_last: bool = True
    """With ``epochs``: drop each worker's final partial batch (fixed shapes for training); evaluation keeps it,
    so every held-out sample counts whatever the process and worker counts."""
    seed: int = 1234
    """Seed of shard permutations, source mixing, shuffling, augmentation and caption sampling."""
    augment: bool = field(default=True, metadata=cli())
    """Training augmentation as OpenVision's configs: inception crop, then SimCLR colour jitter and grayscale
    (megatron_ov3/data/images.py), seeded per sample and epoch. --no-augment: shorter-side resize and centre
    crop, which evaluation always uses."""
    crop_min_area: float = field(default=0.4, metadata=cli(low=0, high=1, low_open=True))
    """Inception crop: the smallest crop as a fraction of the image area (OpenVision's area_min=40); aspect
    ratio 3/4..4/3; resampled bilinear, antialiased."""
    color_jitter: float = field(default=0.4, metadata=cli(low=0, high=1))
    """SimCLR colour-jitter strength s (OpenVision's jitter_strength=0.4): brightness, contrast and saturation
    factors in [1-0.8s, 1+0.8s] and a hue shift in [-0.2s, 0.2s], in a random order, with probability 0.8;
    0: no jitter."""
    grayscale_prob: float = field(default=0.2, metadata=cli(low=0, high=1))
    """Probability that a training view is made grayscale (SimCLR and OpenVision: 0.2)."""
    contrastive_texts: str = "alt"
    """What the contrastive text tower reads, comma-separated (set from the model's ``contrastive_texts``, which
    documents the choices); two-caption data (Recap-DataComp: alt-text in KEY.txt, recaption in KEY.json) draws
    the recaption sentences per sample and epoch. The caption decoder always reads the full recaption; one-caption
    data feeds its caption to every text."""
    recaption_key: str = field(default=RECAPTION_KEY, metadata=cli())
    """Field of KEY.json that holds the recaption (Recap-DataComp-1B's column, kept by img2dataset's
    --save_additional_columns '["re_caption"]')."""
    max_image_pixels: int = field(default=64_000_000, metadata=cli())
    """Skip (count as ``too_large``) images with more pixels than this, read from the header before decoding
    (a 121-megapixel decompression bomb would otherwise take ~0.5 GB per loader worker)."""
    text_length: int = 80
    """Token length of text-encoder inputs."""
    caption_length: int = 128
    """Token length of caption-decoder inputs."""

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise UsageError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.image_size % 16:
            raise UsageError(f"image size {self.image_size} is not a multiple of 16")
        if self.num_workers < 0:
            raise UsageError("--num-workers must be >= 0")
        if self.shuffle_buffer < 0:
            raise UsageError("--shuffle-buffer must be >= 0")
        if self.max_image_pixels < 1:
            raise UsageError(f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        bad = [t for t in self.contrastive_texts.split(",") if t.strip() not in CONTRASTIVE_TEXTS]
        if bad or len(self.contrastive_texts.split(",")) > len(TEXT_KEYS):
            raise UsageError(f"--contrastive-texts {self.contrastive_texts!r}: give one or two of "
                             f"{', '.join(CONTRASTIVE_TEXTS)}, comma-separated")
        check_numbers(self)  # the ranges the fields declare (augmentation, data weights), also when built in code
        if self.data_path is None:
            return
        sources = self.data_path.split("::")
        if self.data_weights is not None:
            if len(self.data_weights) != len([s for s in sources if s.strip()]):
                raise UsageError(
                    f"--data-weights has {len(self.data_weights)} values for {len(sources)} sources in --data-path"
                )


    def for_evaluation(self, data_path: str, **overrides) -> "DataConfig":
        """The held-out stream: one pass in shard order, every sample (partial batches kept), centre crops and the
        alt-text for the text tower, whatever the training's augmentation and caption choice."""
        values = dict(data_path=data_path, epochs=1, drop_last=False, shuffle_buffer=0, data_weights=None,
                      resample=False, augment=False, contrastive_texts="alt")
        values.update(overrides)
        return dataclasses.replace(self, **values)

    def augmentation(self) -> Optional[Augment]:
        """The training views' parameters, or None (centre crop)."""
        if not self.augment:
            return None
        return Augment(min_area=self.crop_min_area, jitter=self.color_jitter, grayscale_prob=self.grayscale_prob)


def seeded_rng(*parts) -> random.Random:
    """A generator seeded by the SHA-256 of ``parts`` (the same on every host, process and Python run)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def shuffled(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """``stream`` through a shuffle buffer of ``size`` samples drawn by ``rng`` (size 0 or 1: unchanged)."""
    if size <= 1:
        yield from stream
        return
    buf: List[dict] = []
    for smp in stream:
        if len(buf) < size:
            buf.append(smp)
            continue
        i = rng.randrange(size)
        buf[i], smp = smp, buf[i]
        yield smp
    rng.shuffle(buf)
    yield from buf


def epoch_order(shards: List[str], seed: int, source: int, epoch: int) -> List[str]:
    """A source's shards in the seeded order of one epoch (every split of the epoch takes a slice of it)."""
    order = list(shards)
    seeded_rng(seed, "shards", source, epoch).shuffle(order)
    return order


def noise_seed(seed: int, shard: str, key: str, epoch: int) -> int:
    """Per-sample seed for the decoder noise: depends on the sample (its shard's name, see
    :func:`~megatron_ov3.data.shards.shard_name`, and key) and its epoch, not on the data split or the folder."""
    return zlib.crc32(f"{seed}/{shard}/{key}/{epoch}".encode()) & 0x7FFFFFFF


class ShardStream(IterableDataset):
    """Iterable of collated micro-batches for one data-parallel rank (see module docstring)."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, raw_pos: Optional[List[int]] = None,
                 bad: Optional[List[List[int]]] = None, worker_offset: int = 0):
        super().__init__()
        from .tokenizer import Tokenizer

        self.cfg = cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sources = expand_urls(cfg.data_path)
        for i, shards in enumerate(self.sources):
            local = [local_path(u) for u in shards if is_local(u)]
            missing = [u for u in local if not os.path.isfile(u)]
            if missing and len(missing) == len(shards):  # a typo; a few missing shards are counted as bad_shard
                raise MissingFile(
                    f"none of the {len(shards)} shards of source {i + 1} exists (e.g. {missing[0]!r}); "
                    f"check --data-path (brace ranges like shard-{{00000..00009}}.tar)")
        self.kinds = [source_kind(shards) for shards in self.sources]
        if len(set(self.kinds)) > 1:
            raise UsageError(f"--data-path mixes latent sources (with {LATENT_MANIFEST}) and image sources "
                             f"({', '.join(f'source {i + 1}: {k}' for i, k in enumerate(self.kinds))}); train on one "
                             f"kind (cache every source with tools/cache_latents.py, or none)")
        self.weights = cfg.data_weights or [1.0] * len(self.sources)
        self.num_logical = max(1, cfg.num_workers)
        slots = dp_size * self.num_logical
        if not cfg.resample:
            for i, shards in enumerate(self.sources):
                if len(shards) < slots:
                    raise UsageError(
                        f"source {i + 1} has {len(shards)} shards, fewer than data-parallel size {dp_size} x "
                        f"{self.num_logical} workers = {slots}; reshard into more, smaller shards "
                        f"(tools/make_shards.py --samples-per-shard) or use --data-resample"
                    )
        self.raw_pos = list(raw_pos or [0] * self.num_logical)
        self.bad = [list(b) for b in (bad or [[0] * len(REASONS) for _ in range(self.num_logical)])]
        self.worker_offset = worker_offset
        self.tokenizer = Tokenizer(cfg.tokenizer)

    # ---- raw stream of one logical worker ----
    def _source_stream(self, s: int, w: int, on_error) -> Iterator[dict]:
        shards = self.sources[s]
        cfg = self.cfg
        if cfg.resample:
            rng = seeded_rng(cfg.seed, "resample", s, self.dp_rank, w)
            empty = 0
            for draw in itertools.count():
                url = shards[rng.randrange(len(shards))]
                empty += 1
                for smp in iter_tar_samples(url, on_error, cfg.shard_retries, cfg.shard_retry_backoff_s):
                    smp["__epoch__"], smp["__source__"] = draw, s
                    empty = 0
                    yield smp
                if empty > 2 * len(shards) + 8:  # never spin forever on unreadable or empty shards
                    raise UsageError(f"source {s + 1}: {empty} shard draws in a row gave no sample; its shards "
                                     f"are empty or unreadable (e.g. {url!r})")
            return
        slot, stride = self.dp_rank * self.num_logical + w, self.dp_size * self.num_logical
        epochs = itertools.count() if cfg.epochs is None else range(cfg.epochs)
        for epoch in epochs:
            mine, n = epoch_order(shards, cfg.seed, s, epoch)[slot::stride], 0
            for url in mine:
                for smp in iter_tar_samples(url, on_error, cfg.shard_retries, cfg.shard_retry_backoff_s):
                    smp["__epoch__"], smp["__source__"] = epoch, s
                    n += 1
                    yield smp
            if n == 0 and mine and cfg.epochs is None:  # endless mode would spin forever on nothing
                raise UsageError(f"source {s + 1}: a whole epoch over this worker's {len(mine)} shards gave no "
                                 f"sample; they are empty or unreadable (e.g. {mine[0]!r})")

    def _raw_stream(self, w: int, on_error) -> Iterator[dict]:
        streams = [self._source_stream(s, w, on_error) for s in range(len(self.sources))]
        if len(streams) == 1:
            mixed = streams[0]
        else:
            mixed = self._mix(streams, seeded_rng(self.cfg.seed, "mix", self.dp_rank, w))
        yield from shuffled(mixed, self.cfg.shuffle_buffer, seeded_rng(self.cfg.seed, "shuffle", self.dp_rank, w))

    def _mix(self, streams, rng):
        active = list(range(len(streams)))
        while active:
            s = rng.choices(active, weights=[self.weights[i] for i in active])[0]
            try:
                yield next(streams[s])
            except StopIteration:
                active.remove(s)

    # ---- decoding ----
    def _sample_rng(self, smp: dict, what: str) -> random.Random:
        """A generator for one sample, epoch and purpose: independent of the data split and of the resume."""
        return seeded_rng(self.cfg.seed, what, shard_name(smp["__url__"]), smp["__key__"], smp["__epoch__"])

    def _decode(self, smp: dict, count):
        cfg = self.cfg
        kind = sample_kind(smp)
        if kind is None:
            return count("missing_image")
        if kind != self.kinds[smp["__source__"]]:
            return count("wrong_kind")
        caption, recap = caption_of(smp), recaption_of(smp, cfg.recaption_key)
        if caption is None and recap is None:
            return count("missing_caption")
        caption = (caption or "").strip() or recap
        if not caption:
            return count("empty_caption")
        out = {}
        if kind == "image":
            aug = cfg.augmentation()
            img = decode_image(image_bytes(smp), cfg.image_size, aug, self._sample_rng(smp, "view") if aug else None,
                               max_pixels=cfg.max_image_pixels)
            if img is TOO_LARGE:
                return count("too_large")
            if img is None:
                return count("bad_image")
            out["images"] = img
        else:
            lat = self._latent(smp)
            if lat is None:
                return count("bad_latent")
            out["latents"] = lat
        if "cls" in smp:  # class label (webdataset convention), used by zero-shot evaluation; -1: none
            try:
                out["labels"] = torch.tensor(int(smp["cls"].decode().strip()))
            except ValueError:
                out["labels"] = torch.tensor(-1)
        for i, mode in enumerate(t.strip() for t in cfg.contrastive_texts.split(",")):
            # a generator only when drawn; the first text's is the one single-text runs always had
            rng = self._sample_rng(smp, "text" if i == 0 else f"text{i + 1}") if recap is not None and mode != "alt" \
                else None
            text = text_tower_caption(caption, recap, mode, rng)
            out[TEXT_KEYS[i]] = torch.from_numpy(self.tokenizer.encode(text, cfg.text_length))
        out["caption_ids"] = torch.from_numpy(self.tokenizer.encode(recap or caption, cfg.caption_length))
        out["noise_seeds"] = torch.tensor(noise_seed(cfg.seed, shard_name(smp["__url__"]), smp["__key__"],
                                                   smp["__epoch__"]))
        return out

    def _latent(self, smp: dict) -> Optional[torch.Tensor]:
        """The cached latent (16, h, w); of a cache with augmented views (V, 16, h, w), the view this sample
        and epoch draw. None when it cannot be read."""
        try:
            lat = decode_latent(smp["latent.npy"])
        except Exception:
            return None
        side = self.cfg.image_size // 8
        if lat.ndim not in (3, 4) or lat.shape[-2:] != (side, side):
            raise UsageError(
                f"latent shard {smp['__url__']} holds latents of shape {lat.shape}, but this stage trains at "
                f"{self.cfg.image_size}px (expects (16, {side}, {side})); re-run tools/cache_latents.py "
                f"--image-size {self.cfg.image_size}"
            )
        if lat.ndim == 4:
            lat = lat[self._sample_rng(smp, "view").randrange(lat.shape[0])]
        return torch.from_numpy(lat.astype(np.float32))

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_logical:
            raise RuntimeError("worker count changed after the stream was built")
        w = (physical + self.worker_offset) % self.num_logical
        bad = list(self.bad[w])

        replaying = [True]

        def count(reason, _path=None, _exc=None, times=1):
            if not replaying[0]:  # counts of the replayed part are already in the restored state
                bad[REASONS.index(reason)] += times
            return None

        raw = self._raw_stream(w, count)
        pos = self.raw_pos[w]
        # replay (read + shuffle, no decode) past what was already consumed
        for _ in itertools.islice(raw, pos):
            pass
        replaying[0] = False
        batch: List[dict] = []
        streak, at_streak = 0, list(bad)
        for smp in raw:
            pos += 1
            dec = self._decode(smp, count)
            if dec is None:
                streak += 1
                if streak >= UNUSABLE_STREAK:
                    self._nothing_usable(streak, at_streak, bad)
                continue
            streak, at_streak = 0, list(bad)
            batch.append(dec)
            if len(batch) == self.cfg.micro_batch_size:
                out = collate(batch)
                yield self._status(out, w, pos, bad)
                batch = []
        if batch and not self.cfg.drop_last:
            yield self._status(collate(batch), w, pos, bad)
        # finite mode: otherwise a final partial batch is dropped (fixed shapes); a status-only item carries the
        # counts of the samples read after the last full batch
        yield self._status({"_status_only": torch.tensor(1)}, w, pos, bad)

    def _nothing_usable(self, streak: int, before: List[int], bad: List[int]) -> None:
        """Stop a stream that reads samples but can train on none (every image empty, no caption, ...): without
        this an endless epoch loop over such shards would wait for a batch forever."""
        why = ", ".join(f"{r} {b - a}" for r, a, b in zip(REASONS, before, bad) if b > a) or "no reason counted"
        where = "; ".join(f"source {i + 1}: {shards[0]!r}" + (f" (+{len(shards) - 1} more)" if len(shards) > 1 else "")
                          for i, shards in enumerate(self.sources))
        raise UsageError(f"the last {streak} samples read were all unusable ({why}) in {where}; each sample needs "
                         f"a decodable image (jpg/png/webp) and a caption (.txt or a json 'caption'/'text')")

    @staticmethod
    def _status(out, w, pos, bad):
        out["_worker"] = torch.tensor(w)
        out["_raw_pos"] = torch.tensor(pos)
        out["_bad"] = torch.tensor(bad)
        return out


def worker_error_line(message: str) -> str:
    """The user's one line of an error re-raised from a DataLoader worker (whose message is a header and the
    worker's traceback, ending in ``module.Class: the line``)."""
    if not message.startswith("Caught "):
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and " " not in head else last


def sentences(text: str) -> List[str]:
    """The sentences of a caption (split after '.', '!' or '?' followed by white space)."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip())]
    return [p for p in parts if p] or [text.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def text_tower_caption(caption: str, recap: Optional[str], mode: str, rng: Optional[random.Random]) -> str:
    """What the contrastive text tower reads in one ``mode`` (see ``OV3Config.contrastive_texts``): one-caption samples
    (no recaption) always give their caption."""
    if recap is None or mode == "alt":
        return caption
    if mode == "alt-or-recap-sentence" and rng.random() < 0.5:
        return caption
    return rng.choice(sentences(recap))


def collate(samples: List[dict]) -> Dict[str, torch.Tensor]:
    """Stack samples into a batch. ``labels`` exists on some samples only when sources are mixed: the others get
    -1 (no label), so the batch keeps one label per image."""
    keys = list(samples[0])
    if "labels" not in keys and any("labels" in b for b in samples):
        keys.append("labels")
    none = torch.tensor(-1)
    return {k: torch.stack([b.get(k, none) if k == "labels" else b[k] for b in samples]) for k in keys}


def source_kind(shards: List[str]) -> str:
    """'latent' when the source's shard folder holds a latent-cache manifest, else 'image'."""
    if not shards or not is_local(shards[0]):
        return "image"  # latent caches are local (tools/cache_latents.py writes a folder)
    folder = os.path.dirname(os.path.abspath(local_path(shards[0])))
    return "latent" if os.path.isfile(os.path.join(folder, LATENT_MANIFEST)) else "image"


class DataIterator:
    """Yields model batches for one rank and keeps the resumable data position (``state_dict``)."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, state: Optional[dict] = None):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        n = max(1, cfg.num_workers)
        state = state or {}
        if state and len(state.get("raw_pos", [])) != n:
            raise UsageError(
                f"checkpoint data position was saved with {len(state['raw_pos'])} loader workers; resume with "
                f"--num-workers {len(state['raw_pos'])} for an exact continuation"
            )
        self.consumed_batches = int(state.get("consumed_batches", 0))
        self.raw_pos = list(state.get("raw_pos", [0] * n))
        pad = [0] * len(REASONS)  # checkpoints from before a reason existed have shorter vectors
        self.bad = [(list(b) + pad)[:len(REASONS)] for b in state.get("bad", [pad] * n)]
        self._it = None

    def _make(self):
        n = max(1, self.cfg.num_workers)
        ds = ShardStream(self.cfg, self.dp_rank, self.dp_size, self.raw_pos, self.bad,
                         worker_offset=self.consumed_batches % n)
        # pinned batches let the trainer's non_blocking copies overlap the step on a GPU
        loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
                            persistent_workers=False, prefetch_factor=2 if self.cfg.num_workers else None)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._make()
        while True:
            try:
                batch = next(self._it)
            except UsageError as e:  # from a loader worker: "Caught UsageError in DataLoader worker..." + traceback
                raise UsageError(worker_error_line(str(e))) from None
            w = int(batch.pop("_worker"))
            self.raw_pos[w] = int(batch.pop("_raw_pos"))
            self.bad[w] = batch.pop("_bad").tolist()
            if "_status_only" not in batch:
                break
        self.consumed_batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"consumed_batches": self.consumed_batches, "raw_pos": list(self.raw_pos),
                "bad": [list(b) for b in self.bad]}

    def bad_counts(self) -> Dict[str, int]:
        """Skipped samples per reason, summed over workers (since the start of training)."""
        return {r: sum(b[i] for b in self.bad) for i, r in enumerate(REASONS)}
