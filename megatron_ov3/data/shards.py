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
import shlex
import sys
import tarfile
import time
from typing import Dict, Iterator, List, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator
from ..errors import UsageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENT_EXT = "latent.npy"
LATENT_MANIFEST = "latent_cache.json"  # written by tools/cache_latents.py beside latent shards: a latent source


def is_local(url: str) -> bool:
    """A plain path or ``file://`` URL (globbed, size-checked, never retried)."""
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file://") else url


def expand_urls(spec: str) -> List[List[str]]:
    """``"a/{0..3}.tar::b/*.tar::@more.txt"`` -> one list of shard URLs per source: brace expansion for every form,
    globbing for local paths (and for remote ones fsspec can list, when it is installed), and ``@FILE`` for a text
    file listing shards one per line (each line brace-expanded too). A shard is any form webdataset reads: a path,
    ``file://``, ``http(s)://``, ``gs://``, ``s3://`` or ``pipe:COMMAND`` (see :func:`open_shard`)."""
    sources = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        lines = _list_file(part[1:]) if part.startswith("@") else [part]
        paths: List[str] = []
        for line in lines:
            for p in braceexpand.braceexpand(line):
                paths.extend(_glob(p) if any(c in p for c in "*?[") and not p.startswith("pipe:") else [p])
        sources.append(paths)
    if not sources or not all(sources):
        raise UsageError(f"data path {spec!r} names no shards; give e.g. 'shards/{{00000..00009}}.tar', a URL form "
                         f"(https://..., s3://..., pipe:CMD) or @FILE listing shards")
    return sources


def _list_file(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as e:
        raise UsageError(f"--data-path @{path}: cannot read the shard list ({e.strerror}); give a text file with "
                         f"one shard per line") from None


def _glob(pattern: str) -> List[str]:
    if is_local(pattern):
        found = sorted(glob.glob(local_path(pattern)))
        return [("file://" + f) if pattern.startswith("file://") else f for f in found]
    try:
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        return sorted(fs.unstrip_protocol(p) for p in paths)
    except ImportError:
        raise UsageError(f"{pattern!r}: globbing a remote location needs fsspec (pip install fsspec s3fs gcsfs); "
                         f"or list the shards with braces ({{000..099}}) or @FILE") from None


def shard_name(url: str) -> str:
    """The name a shard's samples are seeded by: its file name, however the shard is reached (``x/a.tar``,
    ``file:///x/a.tar``, ``https://host/x/a.tar?sig=..``, ``pipe:aws s3 cp s3://b/x/a.tar -``). Seeds (decoder
    noise, augmentation) then do not depend on where the shards live, so the same shards give the same run
    from any folder or store."""
    if url.startswith("pipe:"):
        tars = [t for t in url[5:].split() if ".tar" in t]
        url = tars[-1] if tars else url[5:].strip()
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def sibling(url: str, name: str) -> Optional[str]:
    """The URL of file ``name`` beside shard ``url`` (in a ``pipe:`` command: the command with its shard argument
    pointing there); None when that cannot be told."""
    if url.startswith("pipe:"):
        parts = url[5:].split()
        tars = [i for i, t in enumerate(parts) if ".tar" in t]
        if not tars:
            return None
        parts[tars[-1]] = parts[tars[-1]].rsplit("/", 1)[0] + "/" + name if "/" in parts[tars[-1]] else name
        return "pipe:" + " ".join(parts)
    base = url.split("?", 1)[0]
    if is_local(url):
        return os.path.join(os.path.dirname(local_path(base)), name)
    return base.rsplit("/", 1)[0] + "/" + name


def _read_small(url: str) -> Optional[bytes]:
    """A small file beside the shards (its size record), or None when it cannot be read."""
    if is_local(url):
        try:
            with open(local_path(url), "rb") as f:
                return f.read()
        except OSError:
            return None
    try:
        with ShardReader(url) as f:
            return f.read_all()
    except (OSError, ValueError, UsageError):
        return None


def expected_count(url: str, _cache: Dict[str, Dict[str, int]] = {}) -> Optional[int]:
    """How many samples shard ``url`` holds, when its writer said so: ``sizes.json`` in its folder (our tools,
    webdataset's ``tarp``/``ShardWriter`` convention) or img2dataset's ``NAME_stats.json`` (``successes``), read
    from the same place as the shard (a folder, a URL's directory, a ``pipe:`` command's)."""
    name = shard_name(url)
    sizes = sibling(url, "sizes.json")
    if sizes is None:
        return None
    if sizes not in _cache:
        try:
            _cache[sizes] = {k: int(v) for k, v in json.loads(_read_small(sizes) or b"{}").items()}
        except (ValueError, TypeError, AttributeError):
            _cache[sizes] = {}
    if name in _cache[sizes]:
        return _cache[sizes][name]
    stats = _read_small(sibling(url, name.rsplit(".", 1)[0] + "_stats.json"))
    try:
        return int(json.loads(stats)["successes"]) if stats else None
    except (ValueError, KeyError, TypeError):
        return None


class ShardReader:
    """One shard opened as webdataset opens it (``webdataset.gopen``: a path, ``file://``, ``pipe:CMD``, curl for
    ``http(s)://``, gsutil for ``gs://``; ``s3://`` through the AWS CLI, the webdataset convention
    ``pipe:aws s3 cp URL -``; other schemes through fsspec when installed). It remembers the last 1 KiB read, so
    the end-of-archive marker is checked on streams as on files, and a command's stderr, so its failure is
    reported with its exit status and the tail of what it said."""

    def __init__(self, url: str, bufsize: int = 1 << 16):
        import tempfile

        from webdataset.gopen import Pipe, gopen, gopen_schemes

        self.url, self.tail, self.stderr = url, b"", None
        scheme = urlparse(url).scheme if not url.startswith("pipe:") else "pipe"
        command = {"pipe": lambda: url[5:],
                   "http": lambda: f"curl --connect-timeout 30 -f -sS -L {shlex.quote(url)}",
                   "s3": lambda: f"aws s3 cp --only-show-errors {shlex.quote(url)} -"}
        command["https"] = command["http"]
        if scheme in command:
            self.stderr = tempfile.TemporaryFile()
            # 141 (SIGPIPE) and curl's 23 (write error): we stopped reading early, not a failed transfer
            self.stream = Pipe(command[scheme](), mode="rb", shell=True, bufsize=bufsize, ignore_status=[141, 23],
                                  stderr=self.stderr)
        elif scheme in ("", "file") or scheme in gopen_schemes:
            self.stream = gopen(url, "rb")
        else:
            try:
                import fsspec
            except ImportError:
                raise UsageError(f"{url!r}: no opener for {scheme}://; install fsspec and its {scheme} filesystem, "
                                 f"or give it as pipe:COMMAND") from None
            self.stream = fsspec.open(url, "rb").open()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.tail = data[-1024:] if len(data) >= 1024 else (self.tail + data)[-1024:]
        return data

    def read_all(self) -> bytes:
        chunks = []
        while True:
            data = self.read(1 << 16)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def finish(self) -> bool:
        """Read to the end (a command's exit status is checked there); whether the shard ended in the
        end-of-archive marker (two zero 512-byte blocks, which every tar writer puts there)."""
        self.read_all()
        self.close()
        return self.tail == bytes(1024)

    def describe(self, exc: BaseException) -> str:
        """The error with the command's exit status (in ``exc``) and the tail of its stderr."""
        said = ""
        if self.stderr is not None:
            self.stderr.seek(0)
            said = self.stderr.read().decode("utf-8", "replace").strip()[-300:]
        return f"{exc}" + (f"; it said: {said}" if said else "")

    def close(self) -> None:
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        except Exception:
            if exc[0] is None:
                raise


READ_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)
"""What reading a shard raises when the shard or its transfer is damaged."""


def iter_tar_samples(url: str, on_error, retries: int = 0, backoff_s: float = 1.0) -> Iterator[Dict[str, bytes]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one shard (any form :class:`ShardReader` opens).
    Damage costs only what is damaged:

    * a member repeated within a sample: ``on_error("duplicate_member", url, exc)``; the sample keeps its first
      copy and the shard goes on (webdataset's grouping would raise and drop the rest of the shard);
    * a transfer that fails (a command's non-zero exit, a dropped connection) of a remote shard: retried up to
      ``retries`` times, waiting ``backoff_s`` x 1, 2, 4, ... (``on_error("shard_retry", url, exc)`` each time),
      the samples already given skipped; the last failure is also one line on stderr (exit status, the tail of
      what the command said);
    * a missing/unreadable/truncated shard (a cut between two members too: no end-of-archive marker):
      ``on_error("bad_shard", url, exc)`` once and the shard ends (samples before the damage are kept); when
      the shard's size is recorded (:func:`expected_count`), the samples it lost are counted too:
      ``on_error("lost_sample", url, exc, n)``."""
    given, expected, attempt = 0, expected_count(url), 0
    retries = 0 if is_local(url) else retries
    while True:
        try:
            yield from _read_shard(url, on_error, given, expected)
            return
        except _Failed as f:
            given, exc = f.given, f.exc
            if f.transfer and attempt < retries:
                attempt += 1
                on_error("shard_retry", url, exc)
                time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            if f.transfer:
                print(f"warning: shard {url} failed after {attempt + 1} attempts: {exc}", file=sys.stderr, flush=True)
        on_error("bad_shard", url, exc)
        if expected is not None and expected > given:
            on_error("lost_sample", url, exc, expected - given)
        return


class _Failed(Exception):
    """An attempt at a shard ended early: ``transfer`` (the stream or command failed: worth another attempt) or
    not (the shard itself is short or unreadable); ``given`` samples were read."""

    def __init__(self, given: int, exc: BaseException, transfer: bool):
        super().__init__(str(exc))
        self.given, self.exc, self.transfer = given, exc, transfer


def _read_shard(url: str, on_error, skip: int, expected: Optional[int]) -> Iterator[Dict[str, bytes]]:
    """One attempt at a shard, skipping its first ``skip`` samples (given by an earlier attempt)."""
    n = 0

    def duplicates(exc):
        if isinstance(exc, ValueError) and "duplicate file name" in str(exc.args[0] if exc.args else ""):
            on_error("duplicate_member", url, exc)
            return True
        raise exc

    stream = None
    try:
        stream = ShardReader(url)
        members = tar_file_iterator(stream)
        for sample in group_by_keys(({**m, "__url__": url} for m in members), handler=duplicates):
            n += 1
            if n > skip:
                yield sample
        complete = stream.finish()
    except READ_ERRORS as first:
        err, transfer = first, False
        if stream is not None:
            try:
                stream.close()  # a command's exit status: did the transfer fail, or is the shard itself short?
            except OSError as closing:
                err, transfer = closing, True
            err = OSError(stream.describe(err))
        transfer = transfer or (not is_local(url) and not isinstance(first, (tarfile.TarError, EOFError)))
        raise _Failed(max(n, skip), err, transfer) from None
    if expected is not None and n < expected:  # cut at a member boundary: tarfile sees a normal end
        raise _Failed(n, EOFError(f"{url} ends after {n} of its {expected} samples"), False)
    if not complete:
        raise _Failed(n, EOFError(f"{url} has no end-of-archive blocks (cut at a member boundary)"), False)


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
