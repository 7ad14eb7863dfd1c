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
  and the frozen VAE decoder. Load its weights from the export with ``OV3RAEDecoder.from_export(path)`` (a
  strict load; RAE's own strict=False loading only prints missing keys).
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from modeling_ov3 import LatentDecoderTower, OV3Config, OV3Model  # noqa: E402

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
        return self.model(pixel_values=images.float()).last_hidden_state.float()


class _Out:
    def __init__(self, logits):
        self.logits = logits


class OV3RAEDecoder(nn.Module):
    def __init__(self, config: OV3Config, num_patches: int):
        super().__init__()
        self.config, self.num_patches = config, num_patches
        self.decoder = LatentDecoderTower(config)
        self.vae = None

    @classmethod
    def from_export(cls, path: str):
        model = OV3Model.from_pretrained(path)
        g = model.config.image_size // model.config.pixels_per_token
        dec = cls(model.config, g * g)
        dec.decoder.load_state_dict(model.latent_decoder.state_dict(), strict=True)
        dec.vae = model.load_vae(os.path.join(path, "vae"))
        return dec

    def forward(self, tokens, **_):
        z = self.decoder(tokens.float())
        c = self.config
        x = self.vae.decode((z / c.scaling_factor + c.shift_factor).to(self.vae.dtype)).sample.float()
        b, _, h, w = x.shape
        p = c.pixels_per_token
        logits = x.reshape(b, 3, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * 3)
        return _Out(logits)

    def unpatchify(self, logits):
        b, n, _ = logits.shape
        g, p = int(n ** 0.5), self.config.pixels_per_token
        x = logits.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * p, g * p)
