"""Synthetic image-text shards with learnable signal: one to three coloured shapes on a coloured background, and a
caption that says how many, which shape, which colours and where; the label (``KEY.cls``) is colour x shape
(24 zero-shot classes, :func:`class_names`). Real JPEGs in real tar shards."""
from __future__ import annotations

import io
import random
from typing import Dict

from .shards import ShardWriter

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")  # the shapes' colours
BACKGROUNDS = ("white", "black", "gray")  # no shape has these, so the shape's colour is the scene's colour
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
          "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}
COUNTS = ("one", "two", "three")


def class_names() -> list:
    """Zero-shot classes of the synthetic data: colour x shape (label = its index here; 24 classes)."""
    return [f"{c} {s}" for c in SHAPE_COLORS for s in SHAPES]


def zero_shot_templates() -> list:
    """Prompt templates in the captions' own grammar (as CLIP ships per-dataset templates), over both sizes,
    every place and every background, and the plural form of the scenes with two or three shapes (two thirds of
    them), so averaging them leaves only colour x shape."""
    one = [f"a {size} {{}} in the {place} on a {bg} background" for size in ("large", "small") for place in PLACES
           for bg in BACKGROUNDS]
    return one + [f"{count} {{}}s on a {bg} background" for count in COUNTS[1:] for bg in BACKGROUNDS]


def _draw(d, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def synthetic_sample(rng: random.Random, size: int = 64):
    """(JPEG bytes, caption, label) of one random scene: one to three shapes of one kind and colour on a white,
    black or gray background; one shape has a place (top left, ..., center). The label is the index of
    "colour shape" in :func:`class_names` (zero-shot over 24 classes)."""
    from PIL import Image, ImageDraw

    fg, bg = rng.choice(SHAPE_COLORS), rng.choice(BACKGROUNDS)
    shape, count, big = rng.choice(SHAPES), rng.randint(1, 3), rng.random() < 0.5
    img = Image.new("RGB", (size, size), COLORS[bg])
    d = ImageDraw.Draw(img)
    places = rng.sample(list(PLACES), count)
    r = size * ((0.3 if big else 0.18) if count == 1 else 0.15)
    for place in places:
        cx, cy = (v * size for v in PLACES[place])
        _draw(d, shape, cx, cy, r, COLORS[fg])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    if count == 1:
        caption = f"a {'large' if big else 'small'} {fg} {shape} in the {places[0]} on a {bg} background"
    else:
        caption = f"{COUNTS[count - 1]} {fg} {shape}s on a {bg} background"
    return buf.getvalue(), caption, class_names().index(f"{fg} {shape}")


def write_synthetic_shards(out_dir: str, num_samples: int, samples_per_shard: int = 100, image_size: int = 64,
                           seed: int = 0, prefix: str = "synthetic", corrupt_every: int = 0) -> Dict[str, int]:
    """Write ``num_samples`` synthetic samples; ``corrupt_every=k`` makes every k-th sample broken (for tests:
    truncated JPEG, empty caption or missing caption, in turn). Returns shard sizes."""
    rng = random.Random(seed)
    with ShardWriter(out_dir, samples_per_shard, prefix=prefix) as w:
        for i in range(num_samples):
            jpg, caption, label = synthetic_sample(rng, image_size)
            files = {"jpg": jpg, "txt": caption.encode(), "cls": str(label).encode()}
            if corrupt_every and i % corrupt_every == corrupt_every - 1:
                kind = (i // corrupt_every) % 3
                if kind == 0:
                    files["jpg"] = jpg[: len(jpg) // 3]
                elif kind == 1:
                    files["txt"] = b"   "
                else:
                    del files["txt"]
            w.write(f"{i:08d}", files)
    return w.sizes
