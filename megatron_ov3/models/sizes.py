"""Named OV3 sizes: each names the encoder, the reconstruction decoder, the text encoder and the caption decoder.

Encoder shapes follow OpenVision / big_vision (width/depth/MLP/heads). Choices for the other towers:

* decoder: same shape as the encoder for tiny/Ti/S; ViT-B (768/12/3072/12) for B and larger — the paper's
  decoder ablation found B better than M and L unstable;
* text encoder: CLIP/open_clip text towers of the matching class (B: 512/12, L: 768/12, H/g: 1024/24,
  bigG: 1280/32; So400m: SigLIP's 1152/27);
* caption decoder: the text tower's width and heads with half its depth (CoCa splits its text stack the
  same way);
* embed_dim: the encoder width, as in the released OV3-B/2 and OV3-L/2 checkpoints (proj is width x width).

Exact parameter counts of every tower (``models/accounting.py``) are tested (``tests/unit/test_sizes.py``)
and listed in the README.
"""
from __future__ import annotations

from typing import Dict

from .config import OV3Config, TowerConfig
from ..errors import UsageError

T = TowerConfig

VIT: Dict[str, TowerConfig] = {
    "tiny": T(64, 2, 256, 4),
    "Ti": T(192, 12, 768, 3),
    "S": T(384, 12, 1536, 6),
    "B": T(768, 12, 3072, 12),
    "L": T(1024, 24, 4096, 16),
    "So400m": T(1152, 27, 4304, 16),
    "H": T(1280, 32, 5120, 16),
    "g": T(1408, 40, 6144, 16),
    "bigG": T(1664, 48, 8192, 16),
}

TEXT: Dict[str, TowerConfig] = {
    "tiny": T(64, 2, 256, 4),
    "Ti": T(256, 12, 1024, 4),
    "S": T(384, 12, 1536, 6),
    "B": T(512, 12, 2048, 8),
    "L": T(768, 12, 3072, 12),
    "So400m": T(1152, 27, 4304, 16),
    "H": T(1024, 24, 4096, 16),
    "g": T(1024, 24, 4096, 16),
    "bigG": T(1280, 32, 5120, 20),
}

SIZES = tuple(VIT)


def _decoder(name: str) -> TowerConfig:
    return VIT[name] if name in ("tiny", "Ti", "S") else VIT["B"]


def _caption(name: str) -> TowerConfig:
    t = TEXT[name]
    return T(t.width, max(1, t.depth // 2), t.mlp, t.heads)


def get_config(name: str, **overrides) -> OV3Config:
    """The OV3 config of a named size (``tiny``, ``Ti``, ``S``, ``B``, ``L``, ``So400m``, ``H``, ``g``,
    ``bigG``), with optional field overrides, e.g. ``get_config("B", image_size=128)``."""
    if name not in VIT:
        raise UsageError(f"model size {name!r} is unknown; choose one of {', '.join(SIZES)}")
    base = dict(
        size=name,
        encoder=VIT[name],
        decoder=_decoder(name),
        text=TEXT[name],
        caption=_caption(name),
        embed_dim=VIT[name].width,
    )
    if name == "tiny":
        base.update(vocab_size=512)
    base.update(overrides)
    return OV3Config(**base)


def size_table_markdown(image_size: int = 256) -> str:
    """The README's size table: tower shapes and exact trainable parameters (vocab 32000; tiny: 512)."""
    from .accounting import count_parameters

    def shape(t):
        return f"{t.width}/{t.depth}/{t.mlp}/{t.heads}"

    rows = ["| size | encoder W/D/MLP/H | params | decoder | params | text | params | caption | params | embed "
            "| total |",
            "|---|---|---:|---|---:|---|---:|---|---:|---:|---:|"]
    for name in SIZES:
        cfg = get_config(name, image_size=image_size)
        n = count_parameters(cfg)
        rows.append(
            f"| {name} | {shape(cfg.encoder)} | {n['encoder']:,} | {shape(cfg.decoder)} | {n['decoder']:,} | "
            f"{shape(cfg.text)} | {n['text']:,} | {shape(cfg.caption)} | {n['caption']:,} | {cfg.embed_dim} | "
            f"{n['total']:,} |"
        )
    return "\n".join(rows)
