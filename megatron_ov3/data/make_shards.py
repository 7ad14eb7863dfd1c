"""Build image-text shards from a folder, a table (CSV/TSV/parquet) or existing tars; validate images."""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .shards import ShardWriter, caption_of, expand_urls, image_bytes, iter_tar_samples
from ..errors import MissingFile, UsageError

IMG_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _validate_image(data: bytes) -> Optional[Tuple[int, int, str]]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size[0], im.size[1], (im.format or "jpeg").lower()
    except Exception:
        return None


def from_folder(folder: str) -> Iterator[Tuple[str, Optional[bytes], Optional[str]]]:
    """(key, image bytes, caption) for every image in ``folder`` (recursive) with a same-named .txt."""
    if not os.path.isdir(folder):
        raise MissingFile(f"input folder {folder!r} does not exist")
    files = []
    for root, _, names in os.walk(folder):
        for n in names:
            if n.lower().endswith(IMG_SUFFIXES):
                files.append(os.path.join(root, n))
    if not files:
        raise UsageError(f"input folder {folder!r} contains no .jpg/.jpeg/.png/.webp images")
    for path in sorted(files):
        txt = os.path.splitext(path)[0] + ".txt"
        caption = open(txt, encoding="utf-8", errors="replace").read() if os.path.isfile(txt) else None
        with open(path, "rb") as f:
            yield os.path.relpath(path, folder), f.read(), caption


def from_table(path: str, path_column: str = "path", caption_column: str = "caption"):
    """(key, image bytes, caption) from a CSV/TSV/parquet of local image paths (relative to the table)."""
    if not os.path.isfile(path):
        raise MissingFile(f"table {path!r} does not exist")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid and friends: not a parquet file
            raise UsageError(f"--input-table {path!r} is not a readable parquet file ({type(e).__name__})") from None
        columns = set(rows[0]) if rows else set()
    else:
        delim = "\t" if path.endswith((".tsv", ".tab")) else ","
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter=delim)
                columns = set(reader.fieldnames or [])
                rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as e:
            raise UsageError(f"--input-table {path!r} is not UTF-8 CSV/TSV text ({type(e).__name__}); give a "
                             f"table with a header row") from None
    missing = [c for c in (path_column, caption_column) if c not in columns]
    if missing:
        raise UsageError(
            f"table {path!r} has no column(s) {missing}; it has {sorted(columns)} "
            f"(choose with --path-column / --caption-column)"
        )
    base = os.path.dirname(os.path.abspath(path))
    for i, row in enumerate(rows):
        p = str(row[path_column])
        if "://" in p:
            raise UsageError(f"row {i}: {p!r} is a URL; make_shards reads local files only")
        full = p if os.path.isabs(p) else os.path.join(base, p)
        data = open(full, "rb").read() if os.path.isfile(full) else None
        yield f"{i:09d}", data, row[caption_column]


def _images_in(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, n)))


def imagefolder_classes(folder: str) -> Tuple[List[str], bool]:
    """(sorted class folders of an ImageFolder tree, whether every one is an ImageNet-1k WordNet ID)."""
    from ..eval.classes import imagenet_label

    if not os.path.isdir(folder):
        raise MissingFile(f"--input-imagefolder {folder!r} does not exist")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UsageError(f"--input-imagefolder {folder!r} has no class sub-folders (expected DIR/<class>/<image>)")
    return classes, all(imagenet_label(c) is not None for c in classes)


def from_imagefolder(folder: str, caption_template: str = "a photo of a {}."):
    """(key, image bytes, caption, label) of a labelled tree ``folder/<class>/<image>`` (torchvision's ImageFolder,
    e.g. ImageNet's ``val/<wnid>/*.JPEG``). When every class folder is an ImageNet-1k WordNet ID, labels and names
    are ImageNet's (so a subset of the classes keeps the global labels); otherwise labels follow the sorted
    folder names and the names are the folders'. The caption is ``caption_template`` with the class name."""
    from ..eval.classes import imagenet_classes, imagenet_label

    classes, imagenet = imagefolder_classes(folder)
    for i, c in enumerate(classes):
        label = imagenet_label(c) if imagenet else i
        name = imagenet_classes()[label][1] if imagenet else c
        for n in _images_in(os.path.join(folder, c)):
            with open(os.path.join(folder, c, n), "rb") as f:
                yield f"{c}/{os.path.splitext(n)[0]}", f.read(), caption_template.format(name), label


def read_labels_file(path: str) -> Dict[str, int]:
    """``image name -> label`` from lines ``NAME LABEL`` or ``NAME,LABEL[ ...]`` (e.g. Caffe's ``val.txt`` with
    integer labels, Kaggle's ``LOC_val_solution.csv`` with a WordNet ID first); a header line is skipped."""
    from ..eval.classes import imagenet_label

    if not os.path.isfile(path):
        raise MissingFile(f"--labels-file {path!r} does not exist")
    out: Dict[str, int] = {}
    for i, line in enumerate(open(path, encoding="utf-8")):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        token = parts[1] if len(parts) > 1 else ""
        label = int(token) if token.isdigit() else imagenet_label(token)
        if label is None:
            if i == 0:
                continue  # a header
            raise UsageError(f"--labels-file {path!r} line {i + 1}: {token!r} is neither an integer label nor an "
                             f"ImageNet-1k WordNet ID")
        out[os.path.splitext(os.path.basename(parts[0]))[0]] = label
    if not out:
        raise UsageError(f"--labels-file {path!r} holds no 'NAME LABEL' line")
    return out


def from_labels_file(folder: str, labels_file: str, names: Sequence[str], caption_template: str = "a photo of a {}."):
    """(key, image bytes, caption, label) of the images of a flat ``folder`` (e.g. ImageNet's 50,000 validation
    JPEGs) labelled by ``labels_file``; ``names``: class names by label (captions). Unlabelled images are
    skipped (counted as ``missing_label``)."""
    if not os.path.isdir(folder):
        raise MissingFile(f"--input-dir {folder!r} does not exist")
    labels = read_labels_file(labels_file)
    top = max(labels.values())
    if top >= len(names):
        raise UsageError(f"--labels-file has label {top}, but --classnames names {len(names)} classes")
    for n in _images_in(folder):
        stem = os.path.splitext(n)[0]
        label = labels.get(stem)
        if label is None:
            yield stem, MISSING_LABEL, None, None
            continue
        with open(os.path.join(folder, n), "rb") as f:
            yield stem, f.read(), caption_template.format(names[label]), label


MISSING_LABEL = object()  # image bytes of an item whose image has no line in the labels file

BAD_SHARD = object()
"""Stands for the image bytes of a (key, data, caption) item that reports an unreadable input shard (the key
is the shard's URL): :func:`write_shards` counts it as ``bad_shard`` and lists the URL in its stats."""


def from_tars(spec: str):
    """(key, image bytes, caption) of every sample in existing shards (for re-sharding). A shard that cannot be
    read to its end (truncated, corrupt) yields ``(url, BAD_SHARD, None)`` after its readable samples."""
    for source in expand_urls(spec):
        for url in source:
            if not os.path.isfile(url):
                raise MissingFile(f"shard {url!r} does not exist")
            errors: List[str] = []
            for smp in iter_tar_samples(url, lambda *a: a[0] == "bad_shard" and errors.append(a[1])):
                yield f"{os.path.basename(url)}-{smp['__key__']}", image_bytes(smp), caption_of(smp)
            if errors:
                yield url, BAD_SHARD, None


def write_shards(samples, out_dir: str, samples_per_shard: int, prefix: str = "shard", progress: bool = True) -> Dict:
    """Validate and write samples; returns stats (written, skipped per reason, sizes, caption/image stats)."""
    from tqdm import tqdm

    skipped: Counter = Counter()
    bad_shards: List[str] = []
    n_ok, cap_len, widths, heights = 0, 0, 0, 0
    with ShardWriter(out_dir, samples_per_shard, prefix=prefix) as w:
        for key, data, caption, *label in tqdm(samples, desc="samples", unit="img", disable=not progress):
            if data is MISSING_LABEL:
                skipped["missing_label"] += 1
                continue
            if data is BAD_SHARD:
                skipped["bad_shard"] += 1
                bad_shards.append(key)
                continue
            if data is None:
                skipped["missing_image"] += 1
                continue
            meta = _validate_image(data)
            if meta is None:
                skipped["bad_image"] += 1
                continue
            if caption is None:
                skipped["missing_caption"] += 1
                continue
            caption = caption.strip()
            if not caption:
                skipped["empty_caption"] += 1
                continue
            ext = {"jpeg": "jpg", "mpo": "jpg"}.get(meta[2], meta[2])
            if ext not in ("jpg", "png", "webp"):
                ext = "jpg"
            files = {ext: data, "txt": caption.encode()}
            if label and label[0] is not None:  # webdataset's class-label member, read by zero-shot evaluation
                files["cls"] = str(int(label[0])).encode()
            w.write(key.replace(".", "_").replace("/", "_"), files)
            n_ok += 1
            cap_len += len(caption.split())
            widths += meta[0]
            heights += meta[1]
    stats = {
        "written": n_ok, "skipped": dict(skipped), "bad_input_shards": bad_shards, "shards": len(w.sizes),
        "sizes": w.sizes,
        "mean_caption_words": cap_len / max(n_ok, 1), "mean_width": widths / max(n_ok, 1),
        "mean_height": heights / max(n_ok, 1),
    }
    return stats
