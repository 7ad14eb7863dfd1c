"""OpenVision 3 for Hugging Face transformers: self-contained (torch + transformers + diffusers), written by
megatron_ov3's tools/convert_to_hf.py next to the weights so that

    AutoModel.from_pretrained(export_dir, trust_remote_code=True)

loads offline. The VAE is the ``vae/`` diffusers subfolder of the export. Outputs: per-layer hidden states
(Hugging Face indexing: [0] embeddings, [i] layer i; LLaVA selects -2), patch tokens, the pooled contrastive
embedding; ``get_text_features`` for zero-shot scoring; ``reconstruct`` through the exported OV3 decoder.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class OV3Config(PretrainedConfig):
    model_type = "ov3"

    def __init__(self, encoder=None, decoder=None, text=None, embed_dim=64, image_size=256, latent_channels=16,
                 vae_downsample=8, patch_size=16, latent_patch_size=None, class_token=False, register_tokens=0,
                 pos_embed_ref_grid=16,
                 pos_embed_type="sincos", final_ln_after_pool=True, layernorm_eps=1e-6, vocab_size=32000,
                 padded_vocab_size=32000,
                 text_context_length=80, pad_id=0, scaling_factor=0.3611, shift_factor=0.1159,
                 decoder_noise_norm="none", decoder_noise_tau=0.0, **kwargs):
        self.encoder = encoder or {"width": 64, "depth": 2, "mlp": 256, "heads": 4}
        self.decoder = decoder
        self.text = text
        self.embed_dim, self.image_size = embed_dim, image_size
        if latent_patch_size is None:  # exports before 2026-12 stored the latent patch (2) as patch_size
            latent_patch_size, patch_size = patch_size, vae_downsample * patch_size
        if patch_size != vae_downsample * latent_patch_size:
            raise ValueError(f"patch_size {patch_size} (pixels per token) must be vae_downsample {vae_downsample} x "
                             f"latent_patch_size {latent_patch_size}")
        # patch_size: pixels per token, the name generic code reads (image_size // patch_size tokens per side);
        # latent_patch_size: the encoder's patch over the VAE latent
        self.latent_channels, self.vae_downsample = latent_channels, vae_downsample
        self.patch_size, self.latent_patch_size = patch_size, latent_patch_size
        self.class_token, self.register_tokens = class_token, register_tokens
        self.pos_embed_ref_grid, self.final_ln_after_pool = pos_embed_ref_grid, final_ln_after_pool
        self.pos_embed_type = pos_embed_type
        self.layernorm_eps = layernorm_eps
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        self.text_context_length, self.pad_id = text_context_length, pad_id
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        # the decoder's input as training saw it: 'layernorm' (parameter-free, RAE's convention) or 'none'; and
        # the noise scale it trained with (RAE's noise_tau on the same tokens)
        self.decoder_noise_norm, self.decoder_noise_tau = decoder_noise_norm, decoder_noise_tau
        # conveniences read by LLaVA/RAE-style code
        self.hidden_size = self.encoder["width"]
        self.num_hidden_layers = self.encoder["depth"]
        super().__init__(**kwargs)

    @property
    def pixels_per_token(self):
        return self.patch_size

    @property
    def num_prefix_tokens(self):
        return int(self.class_token) + self.register_tokens


def sincos_2d(width, grid, ref_grid, device=None, dtype=torch.float32):
    pos = torch.arange(grid, device=device, dtype=torch.float64) * (ref_grid / grid)
    y, x = torch.meshgrid(pos, pos, indexing="ij")
    omega = torch.arange(width // 4, device=device, dtype=torch.float64) / (width // 4 - 1 if width > 4 else 1)
    omega = 1.0 / (10000.0 ** omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1).to(dtype)


def resize_table(table, grid):
    """Learned (g*g, W) position table -> grid*grid rows (bicubic, as open_clip's resize_pos_embed)."""
    g = int(round(table.shape[0] ** 0.5))
    if g == grid:
        return table
    img = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return img.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)


class Block(nn.Module):
    """Pre-LN transformer block; ``qkv`` rows are [q; k; v] (standard layout), GELU MLP."""

    def __init__(self, width, mlp, heads, eps, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x):
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, w))
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


def _stack(t, eps, causal=False):
    return nn.ModuleList(Block(t["width"], t["mlp"], t["heads"], eps, causal) for _ in range(t["depth"]))


class VisionTower(nn.Module):
    def __init__(self, c: OV3Config):
        super().__init__()
        w = c.encoder["width"]
        self.c = c
        self.patch_embed = nn.Conv2d(c.latent_channels, w, c.latent_patch_size, c.latent_patch_size, bias=False)
        self.class_token = nn.Parameter(torch.zeros(1, 1, w)) if c.class_token else None
        self.registers = nn.Parameter(torch.zeros(1, c.register_tokens, w)) if c.register_tokens else None
        learned = getattr(c, "pos_embed_type", "sincos") == "learned"
        self.pos_embed = nn.Parameter(torch.zeros(c.pos_embed_ref_grid ** 2, w)) if learned else None
        self.class_pos_embed = nn.Parameter(torch.zeros(1, w)) if learned and c.class_token else None
        self.layers = _stack(c.encoder, c.layernorm_eps)
        self.final_norm = nn.LayerNorm(w, eps=c.layernorm_eps)
        self.proj = nn.Linear(w, c.embed_dim, bias=False)

    def forward(self, latents, output_hidden_states=False):
        c = self.c
        x = self.patch_embed(latents.to(self.patch_embed.weight.dtype))
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            x = x + resize_table(self.pos_embed, grid).to(x.dtype)[None]
        else:
            x = x + sincos_2d(x.shape[-1], grid, c.pos_embed_ref_grid, x.device, x.dtype)[None]
        cls = self.class_token
        if cls is not None and self.class_pos_embed is not None:
            cls = cls + self.class_pos_embed
        prefix = [p.expand(x.shape[0], -1, -1) for p in (cls, self.registers) if p is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x)
            if hidden is not None:
                hidden.append(x)
        tokens = x[:, c.num_prefix_tokens:]
        if c.final_ln_after_pool:
            pooled = self.final_norm(tokens.mean(dim=1))
        else:
            tokens = self.final_norm(tokens)
            pooled = tokens.mean(dim=1)
        return tokens, pooled, self.proj(pooled), hidden


class TextTower(nn.Module):
    def __init__(self, c: OV3Config):
        super().__init__()
        w = c.text["width"]
        self.c = c
        self.token_embedding = nn.Embedding(c.padded_vocab_size, w)
        self.pos_embedding = nn.Parameter(torch.zeros(c.text_context_length, w))
        self.layers = _stack(c.text, c.layernorm_eps)
        self.final_norm = nn.LayerNorm(w, eps=c.layernorm_eps)
        self.proj = nn.Linear(w, c.embed_dim, bias=False)

    def forward(self, ids):
        b, n = ids.shape
        x = self.token_embedding(ids) + self.pos_embedding[:n]
        for layer in self.layers:
            x = layer(x)
        nonpad = (ids != self.c.pad_id).long()
        idx = (nonpad * torch.arange(1, n + 1, device=ids.device)).argmax(dim=1)
        return self.proj(self.final_norm(x[torch.arange(b, device=x.device), idx]))


def decoder_input(tokens, c):
    """Encoder tokens -> the decoder's input as training saw it, before its noise (``decoder_noise_norm``
    'layernorm': each token normalised without affine parameters, RAE's convention)."""
    if getattr(c, "decoder_noise_norm", "none") != "layernorm":
        return tokens
    return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=c.layernorm_eps).to(tokens.dtype)


class LatentDecoderTower(nn.Module):
    def __init__(self, c: OV3Config):
        super().__init__()
        d = c.decoder["width"]
        self.c = c
        self.in_proj = nn.Linear(c.encoder["width"], d)
        self.layers = _stack(c.decoder, c.layernorm_eps)
        self.final_norm = nn.LayerNorm(d, eps=c.layernorm_eps)
        self.head = nn.Linear(d, c.latent_patch_size ** 2 * c.latent_channels)

    def normalise(self, tokens):
        return decoder_input(tokens, self.c)

    def forward(self, tokens, normalised=False):
        """Encoder tokens (B, N, W) -> predicted latents; ``normalised``: the tokens already went through
        :meth:`normalise` (RAE's encoder output, to which RAE adds its noise)."""
        c = self.c
        x = self.in_proj(tokens if normalised else self.normalise(tokens))
        g = int(math.isqrt(x.shape[1]))
        x = x + sincos_2d(x.shape[-1], g, c.pos_embed_ref_grid, x.device, x.dtype)[None]
        for layer in self.layers:
            x = layer(x)
        x = self.head(self.final_norm(x)).float()
        b, p, ch = x.shape[0], c.latent_patch_size, c.latent_channels
        x = x.reshape(b, g, g, p, p, ch)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, ch, g * p, g * p)


@dataclass
class OV3Output(ModelOutput):
    last_hidden_state: torch.FloatTensor = None  # (B, N, W) patch tokens
    pooler_output: torch.FloatTensor = None  # (B, W) pooled, after the final LayerNorm
    image_embeds: torch.FloatTensor = None  # (B, E) contrastive embedding (unnormalised)
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None  # depth+1 x (B, prefix+N, W)
    latents: torch.FloatTensor = None  # (B, 16, H/8, W/8) VAE latents the encoder saw


class OV3Model(PreTrainedModel):
    config_class = OV3Config
    base_model_prefix = "ov3"
    main_input_name = "pixel_values"
    _no_split_modules = ["Block"]

    def __init__(self, config: OV3Config):
        super().__init__(config)
        self.vision = VisionTower(config)
        self.text = TextTower(config) if config.text else None
        self.latent_decoder = LatentDecoderTower(config) if config.decoder else None
        self.vae = None
        self.post_init()

    def _init_weights(self, module):  # weights always come from the checkpoint
        pass

    def load_vae(self, path: Optional[str] = None):
        """Load the frozen VAE from ``path`` (default: the export's ``vae/`` folder)."""
        from diffusers import AutoencoderKL

        path = path or os.path.join(self.config._name_or_path, "vae")
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(self.device)
        self.vae.requires_grad_(False).eval()
        return self.vae

    def _vae(self):
        return self.vae if self.vae is not None else self.load_vae()

    @torch.no_grad()
    def encode_latents(self, pixel_values):
        """Images in [-1, 1] -> normalised VAE latents (posterior mean)."""
        vae = self._vae()
        mean = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean
        return ((mean - self.config.shift_factor) * self.config.scaling_factor).to(pixel_values.dtype)

    def decode_latents(self, latents):
        vae = self._vae()
        z = latents / self.config.scaling_factor + self.config.shift_factor
        return vae.decode(z.to(vae.dtype)).sample

    def forward(self, pixel_values=None, latents=None, output_hidden_states=False, return_dict=True, **_):
        if latents is None:
            latents = self.encode_latents(pixel_values)
        tokens, pooled, emb, hidden = self.vision(latents, output_hidden_states)
        out = OV3Output(last_hidden_state=tokens, pooler_output=pooled, image_embeds=emb,
                        hidden_states=tuple(hidden) if hidden is not None else None, latents=latents)
        return out if return_dict else out.to_tuple()

    def get_image_features(self, pixel_values=None, latents=None):
        return self.forward(pixel_values=pixel_values, latents=latents).image_embeds

    def get_text_features(self, input_ids):
        if self.text is None:
            raise ValueError("this export has no text tower")
        return self.text(input_ids)

    def reconstruct(self, pixel_values=None, latents=None):
        """(predicted latents, decoded images in about [-1, 1]) through the exported OV3 decoder (no noise)."""
        if self.latent_decoder is None:
            raise ValueError("this export has no reconstruction decoder")
        tokens = self.forward(pixel_values=pixel_values, latents=latents).last_hidden_state
        z_hat = self.latent_decoder(tokens)
        return z_hat, self.decode_latents(z_hat)
