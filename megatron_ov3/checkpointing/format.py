"""Checkpoint format: folder layout, ``latest``, atomic publish, pruning (no DeepSpeed here).

Layout of ``--save DIR``::

    DIR/iter_0000100/      DeepSpeed files (model, ZeRO optimizer shards, scheduler) + trainer state
                           (client state: iteration, consumed samples, data position of every DP rank)
                           + rng_rank{R}.pt (each rank's CPU/CUDA/megatron-tracker RNG) + ov3_config.json (the model)
                           + job_config.json (the resolved job configuration)
    DIR/latest             "iter_0000100"

A save writes into ``iter_N.partial``; only when every rank has finished does rank 0 rename it to ``iter_N``
and then replace ``latest`` (write-to-temp + rename). A crash or ``kill -9`` at any point leaves the previous
``latest`` and its directory untouched. ``--keep-last N`` prunes older ``iter_*`` directories afterwards.
RNG files are plain tensor dicts loaded with ``weights_only=True``.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

from ..errors import UsageError

LATEST = "latest"
_TAG = re.compile(r"^iter_(\d{7,})$")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_latest(directory: str) -> Optional[str]:
    """The complete checkpoint tag ``latest`` points to (None when there is none)."""
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not _TAG.match(tag) or not os.path.isdir(os.path.join(directory, tag)):
        raise UsageError(f"{path} points to {tag!r}, which is not a complete checkpoint directory")
    return tag


def start_partial(directory: str, partial: str) -> None:
    """Rank 0, before a save: an empty ``partial`` folder (a crashed earlier attempt's is removed)."""
    os.makedirs(directory, exist_ok=True)
    shutil.rmtree(os.path.join(directory, partial), ignore_errors=True)


def publish(directory: str, partial: str, tag: str, keep_last: Optional[int] = None) -> None:
    """Rank 0, after every rank finished writing ``partial``: rename it to ``tag``, then replace ``latest``
    (write-to-temp + fsync + rename). A crash at any point leaves the previous ``latest`` complete."""
    if os.environ.get("OV3_FAULT_KILL_IN_SAVE"):  # fault injection for the crash-safety test
        os.kill(os.getpid(), 9)
    final = os.path.join(directory, tag)
    if os.path.isdir(final):  # re-saving an iteration: move the old copy aside first
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(os.path.join(directory, partial), final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(os.path.join(directory, partial), final)
    tmp = os.path.join(directory, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, LATEST))
    if keep_last:
        prune(directory, keep_last, tag)


def prune(directory: str, keep_last: int, current: str) -> None:
    tags = sorted((t for t in os.listdir(directory) if _TAG.match(t)), key=lambda t: int(_TAG.match(t).group(1)))
    for t in tags[:-keep_last]:
        if t != current:
            shutil.rmtree(os.path.join(directory, t), ignore_errors=True)


