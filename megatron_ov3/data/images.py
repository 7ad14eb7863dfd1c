"""Image decoding and preprocessing: OpenVision's training augmentation and the evaluation centre crop.

Training (OpenVision's configs: ``inception_crop(area_min=40, method="bilinear", antialias=True)|
simclr_jitter_gray(jitter_strength=0.4)``; the PyTorch form in OpenVision's open_clip fork is torchvision's
``RandomResizedCrop(scale=(0.4, 1))``, ``ColorJitter(0.32, 0.32, 0.32, 0.08)`` with p 0.8 and
``RandomGrayscale(0.2)``):

* :func:`inception_box` draws a crop of 40-100 % of the image area with aspect ratio in [3/4, 4/3] (log-uniform;
  torchvision's algorithm: 10 tries, then the central crop of the clamped ratio);
* :func:`crop_resize` resamples that box to ``size x size`` with PIL's bilinear filter, whose support grows with
  the downscale factor (antialiased). JPEGs are first decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
  ``Image.draft``) when the box stays at least ``size`` pixels on its shorter side at that scale, so a 128px
  stage does not pay for decoding every pixel of a large source;
* :func:`color_jitter` applies brightness, contrast, saturation (factors in [1-0.8s, 1+0.8s]) and hue (shift in
  [-0.2s, 0.2s] of the circle) in a random order with probability 0.8, then grayscale with probability 0.2,
  as torchvision does on PIL images (``ImageEnhance`` and an HSV hue shift).

Every random draw comes from a ``random.Random`` the caller seeds per sample (seed, shard, key, epoch), so a view
depends only on the sample and its epoch: exact resume and data-parallel independence hold, and each epoch sees
another view. Evaluation uses :func:`center_crop` (shorter side to ``size``, bicubic, central square).
torchvision is not used because it does not import beside the CPU torch build this project pins; the few PIL
calls it would make are made here directly.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

RATIO = (3 / 4, 4 / 3)  # inception / torchvision aspect-ratio range


@dataclass(frozen=True)
class Augment:
    """The training augmentation's parameters (built from :class:`~megatron_ov3.data.pipeline.DataConfig`)."""

    min_area: float = 0.4
    jitter: float = 0.4
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2

    def describe(self) -> dict:
        return {"crop_min_area": self.min_area, "color_jitter": self.jitter, "grayscale_prob": self.grayscale_prob}


def inception_box(width: int, height: int, min_area: float, rng: random.Random) -> Tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random crop covering ``min_area``..1 of the image area."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    ratio = width / height  # fallback: the whole image, clamped to the ratio range, centred
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_resize(im, box: Tuple[int, int, int, int], size: int):
    """Resample ``box`` (left, top, w, h, in the image's full-size coordinates) of a not yet loaded PIL image to
    ``size x size``, bilinear and antialiased; JPEGs are decoded at the smallest DCT scale that keeps the box at
    least ``size`` pixels on its shorter side."""
    from PIL import Image

    full_w, full_h = im.size
    left, top, w, h = box
    if im.format == "JPEG" and min(w, h) >= 2 * size:
        need = (math.ceil(full_w * size / w), math.ceil(full_h * size / h))
        im.draft("RGB", need)
    sx, sy = im.size[0] / full_w, im.size[1] / full_h
    im.load()
    im = to_rgb(im)
    return im.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


def center_crop(im, size: int):
    """Shorter side resized to ``size`` (bicubic), central ``size x size`` square (evaluation and --no-augment)."""
    from PIL import Image

    im.load()
    im = to_rgb(im)
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _hue(im, shift: float):
    from PIL import Image

    h, s, v = im.convert("HSV").split()
    hh = np.asarray(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        hh = hh + np.uint8(int(round(shift * 255)) % 256)
    return Image.merge("HSV", (Image.fromarray(hh, "L"), s, v)).convert("RGB")


def color_jitter(im, aug: Augment, rng: random.Random):
    """SimCLR colour jitter (torchvision's PIL semantics) with probability ``jitter_prob``, then grayscale with
    probability ``grayscale_prob``; ``im`` is an RGB PIL image."""
    from PIL import ImageEnhance

    if aug.jitter > 0 and rng.random() < aug.jitter_prob:
        b = c = s = 0.8 * aug.jitter
        hue = 0.2 * aug.jitter
        ops = [("brightness", rng.uniform(max(0.0, 1 - b), 1 + b)), ("contrast", rng.uniform(max(0.0, 1 - c), 1 + c)),
               ("saturation", rng.uniform(max(0.0, 1 - s), 1 + s)), ("hue", rng.uniform(-hue, hue))]
        rng.shuffle(ops)
        for name, factor in ops:
            if name == "brightness":
                im = ImageEnhance.Brightness(im).enhance(factor)
            elif name == "contrast":
                im = ImageEnhance.Contrast(im).enhance(factor)
            elif name == "saturation":
                im = ImageEnhance.Color(im).enhance(factor)
            else:
                im = _hue(im, factor)
    if aug.grayscale_prob > 0 and rng.random() < aug.grayscale_prob:
        im = im.convert("L").convert("RGB")
    return im


def augmented(im, size: int, aug: Augment, rng: random.Random):
    """One training view of an opened (not yet loaded) PIL image: inception crop, then colour jitter."""
    box = inception_box(im.size[0], im.size[1], aug.min_area, rng)
    return color_jitter(crop_resize(im, box, size), aug, rng)


def to_rgb(im):
    """PIL image -> 8-bit RGB. 16/32-bit grey (modes I;16*, I) is scaled to 8 bits, not clipped; transparent
    images (RGBA, LA, P/L with transparency) are composited onto white, as Hugging Face image processors
    (``do_convert_rgb``) do, so training and the exported processor see the same pixels."""
    from PIL import Image

    if im.mode.startswith("I"):
        a = np.asarray(im).astype(np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


TOO_LARGE = object()  # decode_image's answer for an image over ``max_pixels``


def decode_image(data: bytes, size: int, aug: Optional[Augment] = None, rng: Optional[random.Random] = None,
                 max_pixels: Optional[int] = None):
    """Bytes -> (3, size, size) float in [-1, 1]: a training view (``aug`` and the sample's ``rng``) or the
    centre crop. None when the image cannot be decoded (corrupt or truncated); :data:`TOO_LARGE` when its
    header says it has more than ``max_pixels`` pixels (nothing decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                return TOO_LARGE
            if im.size[0] < 1 or im.size[1] < 1:
                return None
            out = augmented(im, size, aug, rng) if aug is not None else center_crop(im, size)
            arr = np.asarray(out, dtype=np.uint8)
    except Exception:
        return None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
