"""Class names and prompt templates for zero-shot classification, shipped with the package.

``data/imagenet1k.tsv``: the 1000 ImageNet-1k classes, one per line: label, WordNet ID, CLIP's curated class name
(labels follow the sorted WordNet IDs, as torchvision's ImageFolder and timm number them).
``data/clip_templates.txt``: OpenAI CLIP's 80 ImageNet prompt templates (``{}`` = the class name).
Both are public facts, stored in our own format. ``--classnames imagenet`` and ``--templates clip`` name them;
any other value is a file with one entry per line.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import MissingFile, UsageError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SIMPLE_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.")  # for small/synthetic class sets


def _rows(name: str) -> List[str]:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]


@functools.lru_cache(maxsize=None)
def imagenet_classes() -> Tuple[Tuple[str, str], ...]:
    """(WordNet ID, class name) of the 1000 ImageNet-1k classes, in label order."""
    rows = [r.split("\t") for r in _rows("imagenet1k.tsv")]
    assert [int(r[0]) for r in rows] == list(range(1000)), "imagenet1k.tsv is damaged"
    return tuple((r[1], r[2]) for r in rows)


def imagenet_label(wnid: str) -> Optional[int]:
    """The ImageNet-1k label of a WordNet ID (None when it is not one of the 1000)."""
    return _wnid_index().get(wnid)


@functools.lru_cache(maxsize=None)
def _wnid_index() -> Dict[str, int]:
    return {w: i for i, (w, _) in enumerate(imagenet_classes())}


def clip_templates() -> List[str]:
    return _rows("clip_templates.txt")


def read_lines(path: str, flag: str = "file") -> List[str]:
    """Non-empty stripped lines of a text file given by ``flag`` (named in the error when it is missing)."""
    if not os.path.isfile(path):
        raise MissingFile(f"{flag} {path!r} not found; give a text file with one entry per line")
    lines = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    if not lines:
        raise UsageError(f"{flag} {path!r} is empty")
    return lines


def classnames(spec: str, flag: str = "--classnames") -> List[str]:
    """``imagenet`` (the shipped 1000 names) or a file of names, line i = label i."""
    if spec == "imagenet":
        return [name for _, name in imagenet_classes()]
    return read_lines(spec, flag)


def templates(spec: Optional[str], classes_spec: Optional[str] = None, flag: str = "--templates") -> List[str]:
    """``clip`` (CLIP's 80), a file of templates with ``{}``, or by default CLIP's 80 for ImageNet and three simple
    ones otherwise."""
    if spec is None:
        out = clip_templates() if classes_spec == "imagenet" else list(SIMPLE_TEMPLATES)
    elif spec == "clip":
        out = clip_templates()
    else:
        out = read_lines(spec, flag)
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise UsageError(f"{flag}: every template needs a '{{}}' for the class name (e.g. {bad[0]!r} has none)")
    return out


def check_labels(labels: Sequence[int], num_classes: int, flag: str = "--classnames") -> None:
    """A label beyond the class list means the names and the shards disagree: one line naming both."""
    top = max((int(x) for x in labels), default=-1)
    if top >= num_classes:
        raise UsageError(f"the shards carry class label {top}, but {flag} names only {num_classes} classes; give the "
                         f"class list the labels were made with (e.g. --classnames imagenet)")
