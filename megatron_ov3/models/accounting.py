"""Model accounting, the one public place for it: analytic parameter counts of every tower and the FLOPs of
one whole OV3 training step (per sample), for TFLOP/s, MFU, the planner and the benchmark.

Parameters: per transformer layer 2 LayerNorms (4W) + QKV (3W^2+3W) + out proj (W^2+W) + fc1 (WM+M) + fc2
(MW+W), plus each tower's embeddings and heads (:func:`count_parameters`; tested against built models).

FLOPs:

Transformer towers (matmuls only; softmax/norms/elementwise ignored, as in Megatron's accounting), per layer
and token of a sequence of length S, width W, MLP M, forward:  2*(3W^2 + W^2 + 2WM)  [QKV, out-proj, MLP]
+ 4*S*W  [QK^T and attention*V]. Training = 3x forward (backward = 2x). Plus the linear heads/embedding
projections (patch embed, decoder in/out, caption image-proj and LM head: 2*in*out per token).

The frozen VAE is counted by measuring its forward with ``torch.utils.flop_counter`` once per resolution:
encode = 1x forward (no grad); decode for the pixel loss = forward + backward to the *input only*
(~1x forward; no weight gradients) = 2x the decoder forward.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import torch

from .config import OV3Config, TowerConfig, pixel_loss_samples
from .text import padded_vocab_size


def layer_params(width: int, mlp: int) -> int:
    # 2 LayerNorms (4W) + QKV (3W^2+3W) + out proj (W^2+W) + fc1 (WM+M) + fc2 (MW+W)
    return 4 * width * width + 2 * width * mlp + 9 * width + mlp


def stack_params(t: TowerConfig) -> int:
    return t.depth * layer_params(t.width, t.mlp)


def count_parameters(cfg: OV3Config) -> Dict[str, int]:
    """Analytic trainable-parameter count per tower (the frozen VAE and fixed sincos tables excluded; a learned
    encoder position table and class position included).

    Used by the FLOP counter and the scaling planner; tests check it against models built on the meta device.
    """
    e, d, t, c = cfg.encoder, cfg.decoder, cfg.text, cfg.caption
    vocab = padded_vocab_size(cfg.vocab_size)
    patch_out = cfg.patch_size ** 2 * cfg.latent_channels
    learned_pos = (cfg.pos_embed_ref_grid ** 2 + int(cfg.class_token)) * e.width \
        if cfg.position_embedding_type == "learned" else 0
    counts = {
        "encoder": patch_out * e.width + cfg.num_prefix_tokens * e.width + learned_pos + stack_params(e)
        + 2 * e.width + e.width * cfg.embed_dim,
        "decoder": e.width * d.width + d.width + stack_params(d) + 2 * d.width + d.width * patch_out + patch_out,
        "text": vocab * t.width + cfg.text_context_length * t.width + stack_params(t) + 2 * t.width
        + t.width * cfg.embed_dim,
        "caption": e.width * c.width + c.width + vocab * c.width + cfg.caption_length * c.width + stack_params(c)
        + 2 * c.width + c.width * vocab + (t.width * c.width + c.width if cfg.caption_prefix == "alt" else 0),
        "logit_scale": 1,
    }
    counts["total"] = sum(counts.values())
    return counts


def tower_forward_flops(t: TowerConfig, seq: int) -> float:
    """Forward matmul FLOPs of one transformer stack over one sequence of ``seq`` tokens."""
    per_token = 2 * (4 * t.width ** 2 + 2 * t.width * t.mlp) + 4 * seq * t.width
    return float(t.depth * seq * per_token)


def model_flops_per_sample(cfg: OV3Config, image_size: int) -> dict:
    """Training FLOPs per sample of each trainable part (fwd+bwd)."""
    n = cfg.tokens_at(image_size)
    s_enc = n + cfg.num_prefix_tokens
    p2c = cfg.patch_size ** 2 * cfg.latent_channels
    e, d, t, c = cfg.encoder, cfg.decoder, cfg.text, cfg.caption
    vocab = padded_vocab_size(cfg.vocab_size)
    alt = cfg.text_context_length if cfg.caption_prefix == "alt" else 0  # the alt-text's tokens in the prefix
    fwd = {
        "encoder": tower_forward_flops(e, s_enc) + 2 * n * p2c * e.width + 2 * e.width * cfg.embed_dim,
        "decoder": tower_forward_flops(d, n) + 2 * n * (e.width * d.width + d.width * p2c),
        "text": tower_forward_flops(t, cfg.text_context_length) + 2 * t.width * cfg.embed_dim,
        "caption": tower_forward_flops(c, n + alt + cfg.caption_length) + 2 * n * e.width * c.width
        + 2 * alt * t.width * c.width + 2 * cfg.caption_length * c.width * vocab,
    }
    fwd["text"] *= len(cfg.contrastive_texts_list)
    return {k: 3.0 * v for k, v in fwd.items()}


_VAE_FLOPS: dict = {}


def vae_fwd_flops(vae, image_size: int) -> tuple:
    """(encode, decode) forward FLOPs per image of ``vae`` (a FrozenVAE), measured once per VAE architecture
    and resolution (the cache keys on the architecture, so it keeps no VAE alive)."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    key = (json.dumps(dict(vae.vae.config), sort_keys=True, default=str), image_size)
    if key not in _VAE_FLOPS:
        dev = next(vae.vae.parameters()).device
        x = torch.zeros(1, 3, image_size, image_size, device=dev, dtype=vae.dtype)
        with torch.no_grad():
            with FlopCounterMode(display=False) as enc:
                z = vae.vae.encode(x).latent_dist.mean
            with FlopCounterMode(display=False) as dec:
                vae.vae.decode(z)
        _VAE_FLOPS[key] = (float(enc.get_total_flops()), float(dec.get_total_flops()))
    return _VAE_FLOPS[key]


def step_flops_per_sample(cfg: OV3Config, image_size: int, vae=None, encode_in_step: bool = True,
                          micro_batch: Optional[int] = None) -> dict:
    """All FLOPs of one training step per sample, by part, including the VAE when given. ``encode_in_step``
    False: latent input (latent shards), so no VAE encode, but the pixel-loss target is the VAE's decode of
    the given latents (one more decoder forward, no grad). The decode terms scale with the share of the micro
    batch the pixel loss decodes (``cfg.pixel_loss_fraction``, rounded up to whole samples of ``micro_batch``
    when given, as the model does)."""
    parts = model_flops_per_sample(cfg, image_size)
    if vae is not None:
        enc, dec = vae_fwd_flops(vae, image_size)
        share = (cfg.pixel_loss_fraction if micro_batch is None
                 else pixel_loss_samples(cfg.pixel_loss_fraction, micro_batch) / micro_batch)
        if encode_in_step:
            parts["vae_encode"] = enc
        if cfg.pixel_l1_weight > 0 or cfg.lpips_weight > 0:
            parts["vae_decode"] = 2.0 * dec * share
            if not encode_in_step:
                parts["vae_decode_target"] = dec * share
    parts["total"] = sum(parts.values())
    return parts


@functools.lru_cache(maxsize=8)
def flux_vae_flops(image_size: int) -> tuple:
    """(encode, decode) forward FLOPs per image of the full FLUX.1 VAE architecture, counted by
    ``torch.utils.flop_counter`` on the meta device (no weights, no compute). At 256px: 0.273 / 0.622 TFLOP."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from .vae import FLUX_VAE_CONFIG

    with torch.device("meta"):
        ae = AutoencoderKL(**FLUX_VAE_CONFIG)
        x = torch.zeros(1, 3, image_size, image_size)
        with FlopCounterMode(display=False) as enc:
            z = ae.encode(x).latent_dist.mean
        with FlopCounterMode(display=False) as dec:
            ae.decode(z)
    return float(enc.get_total_flops()), float(dec.get_total_flops())


@functools.lru_cache(maxsize=8)
def tiny_vae_flops(image_size: int) -> tuple:
    """(encode, decode) forward FLOPs per image of the toy VAE (``FrozenVAE.tiny``) of CPU runs."""
    from .vae import FrozenVAE

    return vae_fwd_flops(FrozenVAE.tiny(), image_size)
