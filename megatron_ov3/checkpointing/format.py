"""Checkpoint format: folder layout, ``latest``, atomic publish, pruning (no DeepSpeed here).

Layout of ``--save DIR``::

    DIR/iter_0000100/      DeepSpeed files (model, ZeRO optimizer shards, scheduler) + trainer state
                           (client state: iteration, consumed samples, data position of every DP rank)
                           + rng_rank{R}.pt (each rank's CPU/CUDA/megatron-tracker RNG) + ov3_config.json (the model)
                           + job_config.json (the resolved job configuration)
    DIR/latest             "iter_0000100"

A save writes into ``iter_N.partial``; each rank checksums and fsyncs the files it wrote (:func:`seal`), rank 0
writes ``manifest.json`` (every file's size and CRC-32), fsyncs the folder, renames it to ``iter_N`` and then
replaces ``latest`` (write-to-temp + fsync + rename + fsync of the parent). Sealing and publishing run in a
background thread (:class:`Publisher`), so a save stalls training only while DeepSpeed writes its files. A
crash, ``kill -9`` or a node crash at any point leaves the previous ``latest`` and its directory untouched, and
a torn or damaged file is found by :func:`verify` before anything is loaded from it. ``--keep-last N`` prunes
older ``iter_*`` directories afterwards. RNG files are plain tensor dicts loaded with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import zlib
from typing import Dict, Iterable, List, Optional

from ..errors import UsageError

LATEST = "latest"
MANIFEST = "manifest.json"
_TAG = re.compile(r"^iter_(\d{7,})$")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def is_tag(name: str) -> bool:
    """Whether ``name`` is a checkpoint folder name (``iter_0000100``)."""
    return bool(_TAG.match(name))


# what a run writes into its --save folder: checkpoints, DeepSpeed's helper scripts, in-training evaluation
_OWN = re.compile(r"^(latest(\.tmp)?|iter_\d{7,}(\.partial|\.old)?|zero_to_fp32\.py|zero_to_torch\.py|eval|\.nfs.*)$")


def check_save_folder(directory: str, run_outputs=()) -> None:
    """``--save`` must be new, empty, or a checkpoint folder (``latest``, ``iter_*``, DeepSpeed's helper
    scripts, in-training evaluation's ``eval/``), plus this run's own outputs inside it (``run_outputs``: e.g.
    its tensorboard folder); anything else is refused, so checkpoints never mix with (or prune) other files."""
    if not os.path.isdir(directory):
        return
    mine = {os.path.relpath(os.path.abspath(p), os.path.abspath(directory)).split(os.sep)[0] for p in run_outputs if p}
    foreign = sorted(n for n in os.listdir(directory) if not _OWN.match(n) and n not in mine)
    if foreign:
        raise UsageError(f"--save {directory!r} holds files that are not megatron_ov3 checkpoints (e.g. "
                         f"{foreign[0]!r}); give a new or empty folder, or this run's earlier --save folder")


def check_writable(directory: str, flag: str = "--save") -> None:
    """``directory`` (or, while it does not exist, the nearest folder above it) accepts a file: a run finds out
    before training, not at its first save. Nothing is left behind."""
    probe = os.path.abspath(directory)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        fd, path = tempfile.mkstemp(prefix=".ov3-write-check-", dir=probe)
        os.close(fd)
        os.remove(path)
    except OSError as e:
        raise UsageError(f"{flag} {directory!r} is not writable here ({e.strerror} in {probe}); give a folder this "
                         f"user can write") from None


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
    _fsync_dir(directory)
    tmp = os.path.join(directory, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, LATEST))
    _fsync_dir(directory)
    if keep_last:
        prune(directory, keep_last, tag)


def prune(directory: str, keep_last: int, current: str) -> None:
    tags = sorted((t for t in os.listdir(directory) if _TAG.match(t)), key=lambda t: int(_TAG.match(t).group(1)))
    for t in tags[:-keep_last]:
        if t != current:
            shutil.rmtree(os.path.join(directory, t), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum(path: str, sync: bool = False) -> dict:
    """``{"size", "crc32"}`` of a file (CRC-32: finds torn and bit-flipped files at ~1 GB/s; this is integrity,
    not authenticity, which ``weights_only`` loading covers); ``sync`` also fsyncs it."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                break
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def seal(folder: str, names: Iterable[str]) -> Dict[str, dict]:
    """Checksum and fsync the files ``names`` (relative to ``folder``) that this rank wrote."""
    return {n: checksum(os.path.join(folder, n), sync=True) for n in names if os.path.isfile(os.path.join(folder, n))}


def _files(folder: str) -> List[str]:
    out = []
    for root, _dirs, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(n for n in out if n != MANIFEST)


def write_manifest(folder: str, sealed: Dict[str, dict]) -> None:
    """Rank 0 once every rank has sealed its files: the manifest of ``folder`` (files nobody sealed are checksummed
    here), fsync'ed with the folder itself."""
    entries = dict(sealed)
    for name in _files(folder):
        if name not in entries:
            entries[name] = checksum(os.path.join(folder, name), sync=True)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"format": 1, "files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for root, _dirs, _ in os.walk(folder):
        _fsync_dir(root)


def read_manifest(folder: str) -> Optional[Dict[str, dict]]:
    """The manifest's ``{file: {size, crc32}}`` (None for checkpoints written before manifests existed)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        return dict(json.load(open(path))["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is damaged ({type(e).__name__}); the checkpoint cannot be verified: resume from an "
                         f"earlier iter_* folder (edit {LATEST})") from None


def verify(folder: str, names: Optional[Iterable[str]] = None) -> List[str]:
    """Problems of ``folder`` against its manifest (all files, or only ``names``): one line per damaged file."""
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    problems = []
    for name in (sorted(manifest) if names is None else names):
        want, path = manifest[name], os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
            continue
        got = checksum(path) if os.path.getsize(path) == want["size"] else {"size": os.path.getsize(path)}
        if got["size"] != want["size"]:
            problems.append(f"{path} has {got['size']} bytes, the manifest says {want['size']} (truncated?)")
        elif got["crc32"] != want["crc32"]:
            problems.append(f"{path} does not match its checksum in {MANIFEST} (damaged)")
    return problems


def damaged(folder: str, problems: List[str]) -> UsageError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return UsageError(f"checkpoint {folder} is damaged: {problems[0]}{more}; resume from an earlier iter_* folder "
                      f"(edit {LATEST}) or see tools/checkpoint.py verify")


def check(folder: str) -> None:
    """:func:`verify` every file of ``folder``; the first problem as a usage error."""
    problems = verify(folder)
    if problems:
        raise damaged(folder, problems)


class Publisher:
    """Seals this rank's files and (rank 0) publishes a save *off the training path*: each rank checksums and
    fsyncs what it wrote in a background thread and drops ``sealed_rank{R}.json``; rank 0's thread waits for
    every rank's, writes the manifest, fsyncs and publishes (:func:`publish`). Training continues as soon as
    DeepSpeed's files are written; the next save, the end of training or a reader in this process first
    :meth:`wait`\\ s. No collective runs in the thread (it polls the shared folder), so it never interleaves with
    training's. A crash before the publish leaves only an ``iter_N.partial`` behind."""

    def __init__(self):
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self, directory: str, partial: str, tag: str, names: List[str], rank: int, world: int,
              keep_last: Optional[int], timeout_s: float) -> None:
        self.wait()
        args = (directory, partial, tag, names, rank, world, keep_last, timeout_s)
        self.thread = threading.Thread(target=self._run, args=args, name="ov3-checkpoint-publish")
        self.thread.start()

    def _run(self, directory, partial, tag, names, rank, world, keep_last, timeout_s) -> None:
        try:
            folder = os.path.join(directory, partial)
            _write_json(os.path.join(folder, f"sealed_rank{rank}.json"), seal(folder, names))
            if rank == 0:
                write_manifest(folder, _collect_seals(folder, world, timeout_s))
                publish(directory, partial, tag, keep_last)
        except BaseException as e:  # re-raised in the training thread by wait()
            self.error = e

    def wait(self) -> None:
        """Block until the last save is sealed (and, on rank 0, published); re-raise its failure."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"publishing the last checkpoint failed: {error}") from error


def _write_json(path: str, content) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(content, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _collect_seals(folder: str, world: int, timeout_s: float) -> Dict[str, dict]:
    """Every rank's sealed files, once all ``sealed_rank*.json`` exist (polled; a rank that died never writes
    its file, and the save then stays unpublished)."""
    import time

    deadline, sealed = time.time() + timeout_s, {}
    for r in range(world):
        path = os.path.join(folder, f"sealed_rank{r}.json")
        while not os.path.isfile(path):
            if time.time() > deadline:
                raise TimeoutError(f"rank {r} did not seal its files of {folder} within {timeout_s:.0f}s")
            time.sleep(0.02)
        sealed.update(json.load(open(path)))
    return sealed


PUBLISHER = Publisher()


def wait_for_publish() -> None:
    """The last save of this process is complete on disk (and published, on rank 0)."""
    PUBLISHER.wait()
