"""OV3 for RAE (bytetriper/RAE, ``src/stage1``): an encoder with RAE's stage-1 interface and the trained OV3
decoder for RAE's decoder slot. Written into every megatron_ov3 export.

Register the encoder in RAE's ``encoders/__init__.py`` (``register_encoder``) by importing this module; importing
it also registers the ``ov3`` config with ``AutoConfig``, so RAE's ``AutoConfig.from_pretrained(path)`` (without
trust_remote_code) works. RAE normalises inputs with the export's image processor (mean = std = 0.5), which
gives the [-1, 1] range the FLUX VAE expects.

* ``OV3RAEEncoder(path)``: ``patch_size`` = 16 (pixels per token), ``hidden_size`` = encoder width,
  ``forward(images) -> (B, N, C)`` float32 patch tokens, N a perfect square, no class token.
* ``OV3RAEDecoder(config, num_patches)``: ``forward(tokens).logits`` are patchified pixels (B, N, 16*16*3);
  ``unpatchify(logits)`` -> (B, 3, H, W) images in the normalised [-1, 1] range. It runs the OV3 latent decoder
  and the frozen VAE decoder (loaded from the export's ``vae/``). ``OV3RAEDecoder.from_export(path)`` loads its
  weights strictly; RAE loads them from ``rae/decoder.pt`` (``pretrained_decoder_path``).
* ``GeneralDecoder(config, num_patches)``: RAE's decoder constructor with an OV3 branch (tools/rae_handoff.py
  patch puts it in RAE's ``stage1/decoders/__init__.py`` and this file beside ``src/``; RAE's config then
  names the export as ``decoder_config_path``, see the export's ``rae/rae_stage1.yaml``).
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modeling_ov3 import LatentDecoderTower, OV3Config, OV3Model, decoder_input  # noqa: E402

try:
    from transformers import AutoConfig, AutoModel

    AutoConfig.register("ov3", OV3Config, exist_ok=True)
    AutoModel.register(OV3Config, OV3Model, exist_ok=True)
except Exception:  # already registered
    pass


class OV3RAEEncoder(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.model = OV3Model.from_pretrained(path)
        self.model.load_vae(os.path.join(path, "vae"))
        self.model.requires_grad_(False).eval()
        self.patch_size = self.model.config.pixels_per_token
        self.hidden_size = self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, images):
        """Patch tokens as OV3's decoder saw them in training (``decoder_noise_norm`` 'layernorm': normalised
        without affine, as RAE's own encoders end), so RAE's ``noise_tau`` lands on the scale OV3 trained with."""
        return decoder_input(self.model(pixel_values=images.float()).last_hidden_state.float(), self.model.config)


class _Out:
    def __init__(self, logits):
        self.logits = logits


def _load_vae(path: str):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    return vae.requires_grad_(False).eval()


class OV3RAEDecoder(nn.Module):
    """RAE's decoder slot: built as RAE builds its decoder, ``(config, num_patches)`` with the export's config
    (``AutoConfig.from_pretrained(export)``), it loads the frozen VAE from the export's ``vae/`` itself; its state
    dict is the OV3 latent decoder's alone (the file RAE loads: the export's ``rae/decoder.pt``). The VAE is
    held outside the module tree, so RAE's ``load_state_dict`` sees no VAE keys and optimisers no VAE weights."""

    def __init__(self, config: OV3Config, num_patches: int):
        super().__init__()
        self.config, self.num_patches = config, num_patches
        self.decoder = LatentDecoderTower(config)
        root = getattr(config, "_name_or_path", "") or ""
        vae_dir = os.path.join(root, "vae")
        object.__setattr__(self, "vae", _load_vae(vae_dir) if os.path.isdir(vae_dir) else None)

    @classmethod
    def from_export(cls, path: str):
        model = OV3Model.from_pretrained(path)
        g = model.config.image_size // model.config.patch_size
        dec = cls(model.config, g * g)
        dec.decoder.load_state_dict(model.latent_decoder.state_dict(), strict=True)
        if dec.vae is None:
            object.__setattr__(dec, "vae", _load_vae(os.path.join(path, "vae")))
        return dec

    def forward(self, tokens, **_):
        if self.vae is None:
            raise RuntimeError("OV3RAEDecoder has no VAE: build it from an export's config (AutoConfig."
                               "from_pretrained(export)) or with OV3RAEDecoder.from_export(export)")
        z = self.decoder(tokens.float(), normalised=True)  # OV3RAEEncoder's tokens
        c = self.config
        vae = self.vae.to(z.device)
        x = vae.decode((z / c.scaling_factor + c.shift_factor).to(vae.dtype)).sample.float()
        b, _, h, w = x.shape
        p = c.pixels_per_token
        logits = x.reshape(b, 3, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * 3)
        return _Out(logits)

    def unpatchify(self, logits):
        b, n, _ = logits.shape
        g, p = int(n ** 0.5), self.config.pixels_per_token
        x = logits.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * p, g * p)


def GeneralDecoder(config, num_patches):  # noqa: N802 (RAE's name)
    """RAE's decoder constructor with OV3 in it: an OV3 export's config gives :class:`OV3RAEDecoder`, any other
    config RAE's own ViT-MAE decoder (``stage1/decoders/decoder.py``). tools/rae_handoff.py patch makes
    ``stage1.decoders.GeneralDecoder`` this function."""
    if getattr(config, "model_type", None) == "ov3":
        return OV3RAEDecoder(config, num_patches)
    from stage1.decoders.decoder import GeneralDecoder as ViTMAEDecoder

    return ViTMAEDecoder(config, num_patches=num_patches)


def _register_with_rae():
    """Inside an RAE checkout: put OV3RAEEncoder in RAE's encoder registry (``encoder_cls: OV3RAEEncoder``)."""
    try:
        from stage1.encoders import ARCHS, register_encoder
    except Exception:  # not inside RAE
        return
    if "OV3RAEEncoder" not in ARCHS:
        register_encoder(OV3RAEEncoder)


_register_with_rae()
