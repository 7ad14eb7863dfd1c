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
  [-0.2s, 0.2s] of the circle) in a random order with probability 0.8, then grayscale with probability 0.2: the
  operations of torchvision's ColorJitter, computed in float32 NumPy on channel-first arrays (about 5x faster than
  its PIL path, whose 8-bit HSV round trip dominates; :func:`apply_jitter_pil` is that path, the reference the
  tests compare against).

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
from typing import List, Optional, Tuple

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


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, PIL's convert("L") and torchvision's


def jitter_ops(aug: Augment, rng: random.Random) -> Optional[List[Tuple[str, float]]]:
    """The colour jitter this view gets: (operation, factor) in a random order, or None (not applied, p 0.2)."""
    if aug.jitter <= 0 or rng.random() >= aug.jitter_prob:
        return None
    b = c = s = 0.8 * aug.jitter
    hue = 0.2 * aug.jitter
    ops = [("brightness", rng.uniform(max(0.0, 1 - b), 1 + b)), ("contrast", rng.uniform(max(0.0, 1 - c), 1 + c)),
           ("saturation", rng.uniform(max(0.0, 1 - s), 1 + s)), ("hue", rng.uniform(-hue, hue))]
    rng.shuffle(ops)
    return ops


def grey(x: np.ndarray) -> np.ndarray:
    """Luma (H, W) of channel-first float RGB (3, H, W)."""
    return (LUMA @ x.reshape(3, -1)).reshape(x.shape[1:])


def shift_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the HSV hue of channel-first float RGB ``x`` (3, H, W) in [0, 255] by ``shift`` turns; value and
    saturation kept (tf.image.adjust_hue's and torchvision's operation, in float instead of 8-bit HSV). Masks
    enter as products, not ``np.where``/``%``, which cost ~10x more per element here."""
    r, g, b = x
    mx = np.maximum(np.maximum(r, g), b)
    chroma = mx - np.minimum(np.minimum(r, g), b)
    is_r = mx == r
    is_g = (mx == g) > is_r
    is_b = ~(is_r | is_g)
    h = (g - b) * is_r + (b - r + 2 * chroma) * is_g + (r - g + 4 * chroma) * is_b  # hue x 6 x chroma
    h /= np.maximum(chroma, np.float32(1e-6))
    h += np.float32(6 * shift)
    h += np.float32(6) * (h < 0)  # now in [0, 6)
    out = np.empty_like(x)
    for i, n in enumerate((5, 3, 1)):  # HSV -> RGB: V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
        k = h + np.float32(n)
        k -= np.float32(6) * (k >= 6)
        np.minimum(k, 4 - k, out=k)
        np.clip(k, 0, 1, out=k)
        k *= chroma
        np.subtract(mx, k, out=out[i])
    return out


def apply_jitter(x: np.ndarray, ops: List[Tuple[str, float]]) -> np.ndarray:
    """torchvision's ColorJitter operations on channel-first float RGB (3, H, W) in [0, 255], clipped after each
    as there: brightness scales, contrast blends with the mean grey level, saturation blends with the grey image,
    hue rotates. NumPy in float instead of PIL's 8-bit round trips (torchvision's HSV hue costs ~4.6 ms at
    256px, this ~0.7 ms); tests/unit/test_augment.py bounds the difference to the PIL operations."""
    for name, f in ops:
        f = np.float32(f)
        if name == "brightness":
            x = x * f
        elif name == "contrast":
            m = np.float32(grey(x).mean())
            x = (x - m) * f + m
        elif name == "saturation":
            gr = grey(x)
            x = gr + (x - gr) * f
        else:
            x = shift_hue(x, float(f))
        np.clip(x, 0, 255, out=x)
    return x


def apply_jitter_pil(im, ops: List[Tuple[str, float]]):
    """The same operations as torchvision's PIL backend makes them (ImageEnhance; hue through 8-bit HSV): the
    reference the float version is tested against, and the open_clip peer of tools/bench_data.py."""
    from PIL import Image, ImageEnhance

    for name, f in ops:
        if name == "hue":
            h, s, v = im.convert("HSV").split()
            hh = np.asarray(h, dtype=np.uint8)
            with np.errstate(over="ignore"):
                hh = hh + np.uint8(int(round(f * 255)) % 256)
            im = Image.merge("HSV", (Image.fromarray(hh, "L"), s, v)).convert("RGB")
        else:
            enhance = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                       "saturation": ImageEnhance.Color}[name]
            im = enhance(im).enhance(f)
    return im


def color_jitter(x: np.ndarray, aug: Augment, rng: random.Random) -> np.ndarray:
    """SimCLR colour jitter with probability ``jitter_prob``, then grayscale with probability ``grayscale_prob``,
    on channel-first float RGB (3, H, W) in [0, 255]."""
    ops = jitter_ops(aug, rng)
    if ops:
        x = apply_jitter(x, ops)
    if aug.grayscale_prob > 0 and rng.random() < aug.grayscale_prob:
        x = np.repeat(grey(x)[None], 3, 0)
    return x


def augmented(im, size: int, aug: Augment, rng: random.Random) -> np.ndarray:
    """One training view of an opened (not yet loaded) PIL image, channel-first float RGB (3, size, size) in
    [0, 255]: inception crop, then colour jitter."""
    box = inception_box(im.size[0], im.size[1], aug.min_area, rng)
    return color_jitter(planar(crop_resize(im, box, size)), aug, rng)


def planar(im) -> np.ndarray:
    """RGB PIL image -> channel-first float32 (3, H, W) in [0, 255]."""
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1), dtype=np.float32)


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
            arr = augmented(im, size, aug, rng) if aug is not None else planar(center_crop(im, size))
    except Image.DecompressionBombError:  # PIL refuses it from the header (over twice its own pixel limit)
        return TOO_LARGE
    except Exception:
        return None
    return torch.from_numpy(arr).div_(127.5).sub_(1.0)
