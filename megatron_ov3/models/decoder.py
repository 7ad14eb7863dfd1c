"""ViT decoder of the reconstruction branch: (noised) encoder tokens -> predicted VAE latents.

tokens (B, N, W_enc) --(parameter-free LayerNorm, ``decoder_noise_norm`` 'layernorm')--+ sigma*eps (train only,
sigma ~ U[0, tau] per sample) --> Linear -> + sincos-2d
--> TransformerBlock (bidirectional) --> LayerNorm --> Linear(W_dec -> p*p*C) --> unpatchify (B, C, H/8, W/8)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerImplConfig, OV3Config
from .posemb import sincos_2d
from .transformer import build_block, run_block


def per_sample_noise(x: torch.Tensor, tau: float, seeds: Optional[torch.Tensor] = None):
    """``x + sigma * eps`` with ``sigma ~ U[0, tau]`` drawn per sample.

    With ``seeds`` (one int64 per sample, e.g. derived from the sample's global index and the step) each
    sample's sigma and eps come from its own generator, so the noise of a sample does not depend on how the
    global batch is split across data-parallel ranks or micro-batches. Otherwise the default RNG is used.
    """
    b = x.shape[0]
    if seeds is None:
        sigma = torch.rand(b, device=x.device, dtype=torch.float32) * tau
        eps = torch.randn(x.shape, device=x.device, dtype=torch.float32)
    else:
        if seeds.shape != (b,):
            raise ValueError(f"noise seeds must have shape ({b},), got {tuple(seeds.shape)}")
        sig, eps = [], []
        for s in seeds.tolist():
            g = torch.Generator(device=x.device).manual_seed(int(s))
            sig.append(torch.rand(1, generator=g, device=x.device) * tau)
            eps.append(torch.randn(x.shape[1:], generator=g, device=x.device))
        sigma, eps = torch.cat(sig), torch.stack(eps)
    return x + (sigma.view(b, *([1] * (x.dim() - 1))) * eps).to(x.dtype)


def decoder_input(tokens: torch.Tensor, cfg: OV3Config) -> torch.Tensor:
    """The encoder tokens as the decoder and its noise see them: each token normalised to zero mean and unit
    variance without affine parameters (``decoder_noise_norm`` 'layernorm', RAE's convention), or unchanged."""
    if cfg.decoder_noise_norm != "layernorm":
        return tokens
    return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=cfg.layernorm_eps).to(tokens.dtype)


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, g*p, g*p) with N = g*g, row-major tokens, (p, p, C) order inside a token."""
    b, n, _ = x.shape
    g = int(math.isqrt(n))
    if g * g != n:
        raise ValueError(f"cannot unpatchify {n} tokens: not a square grid")
    x = x.reshape(b, g, g, patch, patch, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, g * patch, g * patch)


def patchify(z: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of :func:`unpatchify`: (B, C, H, W) -> (B, N, p*p*C)."""
    b, c, h, w = z.shape
    x = z.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class LatentDecoder(nn.Module):
    def __init__(self, cfg: OV3Config, impl: LayerImplConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.decoder
        self.in_proj = nn.Linear(cfg.encoder.width, t.width)
        self.block = build_block(t, impl, causal=False, eps=cfg.layernorm_eps, name="decoder",
                                 sequence_parallel=True)
        self.final_norm = nn.LayerNorm(t.width, eps=cfg.layernorm_eps)
        self.head = nn.Linear(t.width, cfg.patch_size ** 2 * cfg.latent_channels)

    def forward(self, tokens: torch.Tensor, noise_seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, W_enc) patch tokens -> (B, C, H/8, W/8) predicted normalised latents."""
        cfg = self.cfg
        tokens = decoder_input(tokens, cfg)
        if self.training and cfg.decoder_noise_tau > 0:
            tokens = per_sample_noise(tokens, cfg.decoder_noise_tau, noise_seeds)
        x = self.in_proj(tokens)
        grid = int(math.isqrt(x.shape[1]))
        x = x + sincos_2d(x.shape[-1], grid, cfg.pos_embed_ref_grid, device=x.device, dtype=x.dtype)[None]
        x = run_block(self.block, x)
        x = self.head(self.final_norm(x))
        return unpatchify(x.float(), cfg.patch_size, cfg.latent_channels)
