"""Synthetic image-text shards with learnable signal: a coloured shape on a coloured background, and a
caption that says which shape, which colours and where. Real JPEGs in real tar shards."""
from __future__ import annotations

import io
import random
from typing import Dict

from .shards import ShardWriter

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
          "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}


def synthetic_sample(rng: random.Random, size: int = 64):
    """(JPEG bytes, caption, shape index) of one random scene (the index is the zero-shot class label)."""
    from PIL import Image, ImageDraw

    fg, bg = rng.sample(list(COLORS), 2)
    shape = rng.choice(SHAPES)
    place = rng.choice(list(PLACES))
    big = rng.random() < 0.5
    img = Image.new("RGB", (size, size), COLORS[bg])
    d = ImageDraw.Draw(img)
    cx, cy = (v * size for v in PLACES[place])
    r = size * (0.22 if big else 0.12)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    caption = f"a {'large' if big else 'small'} {fg} {shape} in the {place} on a {bg} background"
    return buf.getvalue(), caption, SHAPES.index(shape)


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
