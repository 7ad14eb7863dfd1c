"""Which pipeline stage owns what: the one definition used by the model builder, the planner and checks.

The encoder's layers are spread evenly over the stages (megatron-core's ``TransformerBlock`` builds
``depth / PP`` layers per stage); the first stage also owns the VAE encode and the patch embedding; the last
stage owns pooling, the ViT decoder, the text encoder, the caption decoder and every loss: they all consume
the encoder's output and are small next to a billion-parameter encoder, so keeping them whole avoids sending
several activations between stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from ..errors import UsageError
from .config import OV3Config

LAST_STAGE_TOWERS = ("decoder", "text", "caption")
"""Towers (besides the encoder share) that live whole on the last stage."""


@dataclass(frozen=True)
class Stage:
    index: int
    first: bool
    """Owns the VAE encode and the patch embedding (megatron ``pre_process``)."""
    last: bool
    """Owns pooling, the decoder, the text towers and the losses (megatron ``post_process``)."""
    encoder_layers: Tuple[int, int]
    """[start, end) of the encoder layers it builds."""
    towers: Tuple[str, ...]
    """Whole towers it owns besides its encoder layers."""


def stage_layout(cfg: OV3Config, pipeline_stages: int) -> List[Stage]:
    """The stages of ``cfg`` split over ``pipeline_stages``; a depth the stages do not divide is a usage error."""
    depth = cfg.encoder.depth
    if pipeline_stages < 1 or depth % pipeline_stages:
        raise UsageError(f"--pipeline-model-parallel-size {pipeline_stages} does not divide the encoder's {depth} "
                         f"layers; use a divisor of {depth}")
    per = depth // pipeline_stages
    return [Stage(i, i == 0, i == pipeline_stages - 1, (i * per, (i + 1) * per),
                  LAST_STAGE_TOWERS if i == pipeline_stages - 1 else ()) for i in range(pipeline_stages)]
