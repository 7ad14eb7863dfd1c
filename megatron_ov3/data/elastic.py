"""Elastic, exact data order: the samples of every global batch depend on (seed, shard list, epoch) only, not on the
data-parallel size, the loader workers or the micro-batch split, so a run saved at DP 4 resumes at DP 2 (or 8, or
with other ``--num-workers``) and consumes exactly the samples the uninterrupted run would have.

How: the shards are dealt, per epoch, into ``V`` fixed *virtual streams* (stream ``v`` reads ``epoch_order[v::V]``
through its own seeded shuffle buffer). A step of global batch ``G`` takes the next ``G / V`` usable samples of
every stream; the global batch is the streams' samples in stream order. Data-parallel rank ``r`` of ``D`` owns the
contiguous streams ``[r V / D, (r + 1) V / D)`` (so the ranks' shares, in rank order, are the global batch in
order), its loader workers split them, and it cuts its share into micro-batches. The position saved is one raw
count per stream (plus its bad-sample counts): layout-free, so any layout for which ``V`` divides evenly resumes it.

Mock data is index-based and elastic already; several weighted sources, ``--data-resample`` and finite epochs
(evaluation) keep the per-rank streams of :class:`~megatron_ov3.data.pipeline.DataIterator`.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UsageError
from .pipeline import (REASONS, UNUSABLE_STREAK, DataConfig, ShardStream, collate, epoch_order, seeded_rng, shuffled,
                       worker_error_line)
from .shards import iter_tar_samples

MAX_AUTO_STREAMS = 1024
"""``--data-streams`` by default: the largest count up to this that divides the global batch and has a shard each
(1024: a recipe's 8192 samples over DP 64 x 8 loader workers leaves every worker 2 streams of 8 samples a step)."""


def auto_streams(global_batch: int, num_shards: int) -> int:
    """The default number of virtual streams: a function of the global batch and the shard list only (never of the
    layout, so every layout of a run agrees on it)."""
    return max(v for v in range(1, min(MAX_AUTO_STREAMS, num_shards, global_batch) + 1) if global_batch % v == 0)


def why_not_elastic(cfg: DataConfig, streams: int, global_batch: int, dp_size: int, num_shards: int,
                    num_sources: int) -> Optional[str]:
    """None when this layout can read the elastic order, else why not (one line for the log)."""
    workers = max(1, cfg.num_workers)
    if num_sources > 1 or cfg.resample:
        return "several weighted sources or --data-resample draw per rank"
    if global_batch % streams or streams % dp_size or streams > num_shards:
        return (f"--data-streams {streams} must divide the global batch {global_batch}, be a multiple of the "
                f"data-parallel size {dp_size} and have a shard each ({num_shards} shards)")
    if workers > streams // dp_size:
        return f"--num-workers {workers} exceeds the {streams // dp_size} streams of each data-parallel rank"
    return None


class StreamWorker(IterableDataset):
    """One loader worker's virtual streams: for every step, the next ``per_step`` usable samples of each, collated
    per stream, with every stream's raw position and bad-sample counts after them."""

    def __init__(self, base: ShardStream, by_worker: List[List[int]], streams: int, per_step: int,
                 pos: Dict[int, int], bad: Dict[int, List[int]]):
        super().__init__()
        self.base, self.by_worker, self.streams, self.per_step = base, by_worker, streams, per_step
        self.pos, self.bad = dict(pos), {v: list(b) for v, b in bad.items()}

    def _raw(self, v: int, on_error):
        cfg, shards = self.base.cfg, self.base.sources[0]

        def epochs():
            for epoch in itertools.count():
                n = 0
                for url in epoch_order(shards, cfg.seed, 0, epoch)[v::self.streams]:
                    for smp in iter_tar_samples(url, on_error, cfg.shard_retries, cfg.shard_retry_backoff_s):
                        smp["__epoch__"], smp["__source__"] = epoch, 0
                        n += 1
                        yield smp
                if n == 0:
                    raise UsageError(f"data stream {v}: a whole epoch over its shards gave no sample; they are empty "
                                     f"or unreadable (e.g. {shards[0]!r})")

        return shuffled(epochs(), cfg.shuffle_buffer, seeded_rng(cfg.seed, "stream-shuffle", v))

    def __iter__(self):
        info = get_worker_info()
        mine = self.by_worker[info.id if info is not None else 0]
        raws, counters = {}, {}
        for v in mine:
            bad = self.bad.setdefault(v, [0] * len(REASONS))
            replaying = [True]

            def count(reason, _path=None, _exc=None, times=1, bad=bad, replaying=replaying):
                if not replaying[0]:  # the replayed part's counts are in the restored state already
                    bad[REASONS.index(reason)] += times

            raws[v] = self._raw(v, count)
            for _ in itertools.islice(raws[v], self.pos.get(v, 0)):  # replay (read + shuffle, no decode)
                pass
            replaying[0] = False
            counters[v] = count
        while True:
            chunk = []
            for v in mine:
                samples, streak, at_streak = [], 0, list(self.bad[v])
                while len(samples) < self.per_step:
                    smp = next(raws[v])
                    self.pos[v] = self.pos.get(v, 0) + 1
                    dec = self.base._decode(smp, counters[v])
                    if dec is None:
                        streak += 1
                        if streak >= UNUSABLE_STREAK:  # the per-rank stream's one line, reasons and shards named
                            self.base._nothing_usable(streak, at_streak, self.bad[v])
                        continue
                    streak, at_streak = 0, list(self.bad[v])
                    samples.append(dec)
                chunk.append((v, collate(samples), self.pos[v], list(self.bad[v])))
            yield chunk


class ElasticIterator:
    """Micro-batches of one data-parallel rank in the elastic order (see the module docstring), with a layout-free
    ``state_dict``: ``{"streams": V, "stream_pos": [[v, raw position], ...], "stream_bad": [[v, counts], ...]}``
    of this rank's streams; :func:`merge_states` joins every rank's into the state any layout resumes from."""

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int, global_batch: int, streams: int,
                 state: Optional[dict] = None):
        self.cfg, self.streams = cfg, streams
        self.per_step = global_batch // streams
        self.mine = list(range(dp_rank * streams // dp_size, (dp_rank + 1) * streams // dp_size))
        workers = max(1, cfg.num_workers)
        self.by_worker = [self.mine[w::workers] for w in range(workers)]
        state = state or {}
        self.pos = {int(v): int(p) for v, p in state.get("stream_pos", [])}
        pad = [0] * len(REASONS)
        self.bad = {int(v): (list(b) + pad)[:len(REASONS)] for v, b in state.get("stream_bad", [])}
        self.base = ShardStream(cfg, 0, 1)  # decoding, tokenizer and the shard list (its own split is unused)
        self._it, self._queue = None, []

    def _make(self):
        ds = StreamWorker(self.base, self.by_worker, self.streams, self.per_step, self.pos, self.bad)
        loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            prefetch_factor=2 if self.cfg.num_workers else None)
        return iter(loader)

    def _step(self) -> None:
        """Read one step's share (one chunk from each worker, in worker order) and cut it into micro-batches."""
        if self._it is None:
            self._it = self._make()
        parts = {}
        for _ in self.by_worker:
            try:
                chunk = next(self._it)
            except UsageError as e:
                raise UsageError(worker_error_line(str(e))) from None
            for v, batch, pos, bad in chunk:
                parts[v], self.pos[v], self.bad[v] = batch, int(pos), [int(x) for x in bad]
        share = {k: torch.cat([parts[v][k] for v in self.mine]) for k in parts[self.mine[0]]}
        m = self.cfg.micro_batch_size
        n = share["noise_seeds"].shape[0]
        if n % m:
            raise UsageError(f"a data-parallel rank's share of the global batch ({n}) is not a multiple of the "
                             f"micro-batch size {m}")
        self._queue = [{k: v[i:i + m] for k, v in share.items()} for i in range(0, n, m)]

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if not self._queue:
            self._step()
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        """This rank's streams' positions at the last step boundary read (saves happen between steps)."""
        return {"streams": self.streams, "stream_pos": [[v, self.pos.get(v, 0)] for v in self.mine],
                "stream_bad": [[v, list(self.bad.get(v, [0] * len(REASONS)))] for v in self.mine]}

    def bad_counts(self) -> Dict[str, int]:
        return {r: sum(self.bad.get(v, [0] * len(REASONS))[i] for v in self.mine) for i, r in enumerate(REASONS)}


def merge_states(states: List[Optional[dict]]) -> Optional[dict]:
    """Every data-parallel rank's elastic state as one (any layout takes its streams from it); None when the
    states are not elastic ones."""
    if not states or not all(s and "stream_pos" in s for s in states):
        return None
    return {"streams": states[0]["streams"], "stream_pos": [p for s in states for p in s["stream_pos"]],
            "stream_bad": [b for s in states for b in s["stream_bad"]]}
