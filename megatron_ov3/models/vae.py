"""The frozen FLUX.1 VAE (diffusers ``AutoencoderKL``): images in [-1, 1] <-> 16-channel latents at 1/8 size.

No VAE parameter is ever trained. ``encode`` runs without autograd and returns the posterior mean, shifted
and scaled: ``(mean - shift_factor) * scaling_factor``. ``decode`` undoes the scaling and runs the VAE decoder
*with* autograd, so the pixel loss sends gradients into the predicted latents (but not into the VAE).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from ..errors import MissingFile, UsageError
from ..options import cli

FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
"""The FLUX.1 VAE architecture (black-forest-labs/FLUX.1-dev, subfolder ``vae``)."""


def flux_vae_config(**overrides) -> dict:
    """FLUX.1 VAE config with overrides (tests shrink ``block_out_channels`` etc. but keep the structure)."""
    cfg = dict(FLUX_VAE_CONFIG)
    cfg.update(overrides)
    return cfg


TINY_VAE_OVERRIDES = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
"""A random-init VAE with the FLUX structure (4 levels = 8x, 16 latent channels) at toy width, for tests/demo."""


VAE_COMPILE_OPTIONS = {"reorder_for_peak_memory": False}
"""Inductor options of the compiled VAE decode. Inductor's peak-memory reordering of the scheduled kernels
(``torch._inductor.config.reorder_for_peak_memory``, on by default) makes the backward of the FLUX decoder's
up-blocks return a latent gradient of exactly zero while the forward stays right (found on the CPU with torch 2.13:
the tiny VAE's gradient norm 0 vs 0.0155 eager; ``tests/unit/test_model.py`` holds it): a compiled decode would
silently remove the pixel loss's signal to the encoder. Turned off for this one graph."""


@dataclass
class VAEDecodeConfig:
    """How the frozen VAE decoder runs for the pixel loss (the dominant cost of a naive OV3 step). Every option
    leaves the math unchanged (up to floating-point rounding)."""

    channels_last: bool = False
    """Run the decoder's convolutions in channels-last memory format (faster cuDNN kernels on GPU)."""
    autocast_bf16: bool = False
    """Keep the VAE weights in their dtype (e.g. fp32) and run the decoder (and the encode of image batches)
    under bf16 autocast."""
    compile: bool = False
    """``torch.compile`` the decoder call (first step compiles; dynamic batch sizes recompile once)."""
    checkpoint: bool = False
    """Activation checkpointing around the decoder: its activations are recomputed in backward instead of
    kept, trading one extra decoder forward for memory (for large micro batches)."""


@dataclass
class VAEConfig:
    """Which frozen VAE the job uses and how its decoder runs (the job configuration's ``vae`` section)."""

    vae_path: Optional[str] = field(default=None, metadata=cli())
    """Local diffusers AutoencoderKL folder (the FLUX.1 VAE, e.g. FLUX.1-dev/vae)."""
    tiny_vae: bool = field(default=False, metadata=cli())
    """Random-init toy VAE of the FLUX structure (CPU demo and tests) instead of ``vae_path``."""
    vae_shift_factor: Optional[float] = field(default=None, metadata=cli())
    """latent = (mean - shift) * scale; None: the VAE config's (FLUX: 0.1159; the official OV3 release uses 0)."""
    vae_scaling_factor: Optional[float] = field(default=None, metadata=cli(low=0, low_open=True))
    """None: the VAE config's (FLUX: 0.3611)."""
    vae_channels_last: bool = field(default=False, metadata=cli())
    """VAE decoder in channels-last memory format."""
    vae_autocast_bf16: bool = field(default=False, metadata=cli())
    """VAE decoder and encoder under bf16 autocast (its weights stay fp32)."""
    vae_decode_compile: bool = field(default=False, metadata=cli())
    """``torch.compile`` the VAE decoder call."""
    vae_decode_checkpoint: bool = field(default=False, metadata=cli())
    """Recompute the VAE decoder's activations in backward (saves memory)."""

    def validate(self) -> None:
        if self.tiny_vae and self.vae_path:
            raise UsageError("give --vae-path or --tiny-vae, not both")
        if not self.tiny_vae and not self.vae_path:
            raise UsageError("give --vae-path (local FLUX.1 VAE folder) or --tiny-vae")

    def decode_config(self) -> VAEDecodeConfig:
        return VAEDecodeConfig(channels_last=self.vae_channels_last, autocast_bf16=self.vae_autocast_bf16,
                               compile=self.vae_decode_compile, checkpoint=self.vae_decode_checkpoint)

    def build(self) -> "FrozenVAE":
        """The frozen VAE with its decode options applied."""
        kw = dict(scaling_factor=self.vae_scaling_factor, shift_factor=self.vae_shift_factor)
        vae = FrozenVAE.tiny(**kw) if self.tiny_vae else FrozenVAE.from_pretrained(self.vae_path, **kw)
        return vae.configure_decode(self.decode_config())

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records about its VAE (read back by export and evaluation)."""
        return {"tiny": bool(self.tiny_vae), "path": self.vae_path, "scaling_factor": self.vae_scaling_factor,
                "shift_factor": self.vae_shift_factor}


def _check_vae_folder(root: str) -> None:
    """One clear line for a folder that is not a diffusers AutoencoderKL (before diffusers raises its own)."""
    import json

    hint = "pass the 'vae' folder of a FLUX.1 download (config.json + diffusion_pytorch_model.safetensors)"
    if not os.path.isfile(os.path.join(root, "config.json")):
        raise MissingFile(f"--vae-path {root!r} has no config.json; {hint}")
    try:
        config = json.load(open(os.path.join(root, "config.json")))
    except ValueError as e:
        raise UsageError(f"--vae-path {root!r}: config.json is not valid JSON ({e}); {hint}") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "AutoencoderKL":
        raise UsageError(f"--vae-path {root!r} holds a {name or 'config without _class_name'}, not an "
                         f"AutoencoderKL; {hint}")
    if not os.path.isfile(os.path.join(root, "diffusion_pytorch_model.safetensors")):
        raise MissingFile(f"--vae-path {root!r} has no diffusion_pytorch_model.safetensors (only safetensors weights "
                          f"are loaded); {hint}")


class FrozenVAE(nn.Module):
    """Frozen diffusers ``AutoencoderKL`` with OV3's latent normalisation."""

    def __init__(self, autoencoder, scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None):
        super().__init__()
        self.vae = autoencoder
        cfg = autoencoder.config
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        shift = cfg.shift_factor if shift_factor is None else shift_factor
        self.shift_factor = float(shift or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.decode_config = VAEDecodeConfig()
        self._decode_fn = self._decode_eager

    def configure_decode(self, config: VAEDecodeConfig) -> "FrozenVAE":
        """Apply a :class:`VAEDecodeConfig` (memory format, autocast, compile, checkpointing) to ``decode``."""
        self.decode_config = config
        if config.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self._decode_fn = (torch.compile(self._decode_eager, options=VAE_COMPILE_OPTIONS) if config.compile
                           else self._decode_eager)
        return self

    # ---- constructors ----
    @classmethod
    def from_config(cls, config: Optional[dict] = None, seed: Optional[int] = None, **kw) -> "FrozenVAE":
        """Random-init VAE of the given architecture (default: the full FLUX.1 VAE)."""
        from diffusers import AutoencoderKL

        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                ae = AutoencoderKL(**(config or FLUX_VAE_CONFIG))
        else:
            ae = AutoencoderKL(**(config or FLUX_VAE_CONFIG))
        return cls(ae, **kw)

    @classmethod
    def tiny(cls, seed: int = 0, **kw) -> "FrozenVAE":
        """The random-init toy VAE of FLUX structure used by tests and the CPU demo."""
        return cls.from_config(flux_vae_config(**TINY_VAE_OVERRIDES), seed=seed, **kw)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None, **kw) -> "FrozenVAE":
        """Load weights from a local diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``),
        e.g. a download of FLUX.1-dev with ``subfolder="vae"``. Never touches the network; safetensors only."""
        from diffusers import AutoencoderKL

        root = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(root):
            raise MissingFile(f"VAE directory {root!r} does not exist; pass a local diffusers VAE folder")
        _check_vae_folder(root)
        try:
            ae = AutoencoderKL.from_pretrained(root, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise UsageError(f"--vae-path {root!r} could not be loaded as a diffusers AutoencoderKL "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); pass the 'vae' folder of "
                             f"a FLUX.1 download (config.json + diffusion_pytorch_model.safetensors)") from None
        return cls(ae, **kw)

    def save_pretrained(self, path: str) -> None:
        self.vae.save_pretrained(path, safe_serialization=True)

    # ---- keep frozen ----
    def train(self, mode: bool = True):  # the VAE is always in eval mode
        super().train(False)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # ---- encode / decode ----
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8), posterior mean, no grad."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"VAE.encode expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.decode_config.autocast_bf16):
            mean = self.vae.encode(images.to(self.dtype)).latent_dist.mean  # bf16 under --vae-autocast-bf16
        return (mean.float() - self.shift_factor) * self.scaling_factor

    def _decode_eager(self, z: torch.Tensor) -> torch.Tensor:
        c = self.decode_config
        if c.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        if c.autocast_bf16:
            with torch.autocast(z.device.type, dtype=torch.bfloat16):
                return self.vae.decode(z).sample.float()
        return self.vae.decode(z).sample.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in about [-1, 1]; differentiable w.r.t. ``latents``."""
        z = (latents / self.scaling_factor + self.shift_factor).to(self.dtype)
        if self.decode_config.checkpoint and torch.is_grad_enabled() and z.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._decode_fn, z, use_reentrant=False)
        return self._decode_fn(z)
