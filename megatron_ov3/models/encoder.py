"""The latent ViT encoder: 16-channel VAE latent -> 2x2 patches -> megatron-core TransformerBlock -> tokens.

Pipeline stages (Megatron convention): ``pre_process`` owns the patch embedding, prefix tokens and position
embedding; ``post_process`` owns pooling, the final LayerNorm and the contrastive projection; the block in
between holds this stage's share of the layers. Without pipeline parallelism both flags are True.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .config import LayerImplConfig, OV3Config
from .posemb import resize_table, sincos_2d
from .transformer import build_block, capture_layer_outputs, gather_sequence, scatter_sequence


@dataclass
class EncoderOutput:
    tokens: torch.Tensor
    """(B, N, W) patch tokens (prefix tokens removed): the raw last-block output, or normalised when
    ``final_ln_after_pool`` is False."""
    pooled: torch.Tensor
    """(B, W) global-average-pooled patch tokens after the final LayerNorm."""
    embedding: torch.Tensor
    """(B, E) contrastive image embedding: ``proj(pooled)`` (not L2-normalised)."""
    hidden_states: Optional[List[torch.Tensor]] = None
    """With ``output_hidden_states``: depth+1 tensors (B, S, W), S = prefix + N; [0] is the block input
    (embeddings), [i] the output of layer i (Hugging Face convention, so LLaVA's layer -2 means the same)."""
    num_prefix_tokens: int = 0


class LatentViTEncoder(nn.Module):
    def __init__(self, cfg: OV3Config, impl: LayerImplConfig, pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.cfg = cfg
        t = cfg.encoder
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            # bias-free conv, as in the released OV3 checkpoints (open_clip `conv1`)
            self.patch_embed = nn.Conv2d(cfg.latent_channels, t.width, cfg.patch_size, cfg.patch_size, bias=False)
            self.class_token = nn.Parameter(torch.zeros(1, 1, t.width)) if cfg.class_token else None
            self.registers = (
                nn.Parameter(torch.randn(1, cfg.register_tokens, t.width) * 0.02) if cfg.register_tokens else None
            )
            if self.class_token is not None:
                nn.init.normal_(self.class_token, std=t.width ** -0.5)
            if cfg.position_embedding_type == "learned":
                g = cfg.pos_embed_ref_grid
                self.pos_embed = nn.Parameter(sincos_2d(t.width, g, g).clone())
                self.class_pos_embed = nn.Parameter(torch.zeros(1, t.width)) if cfg.class_token else None
        self.block = build_block(
            t, impl, causal=False, eps=cfg.layernorm_eps, name="encoder", split_across_pipeline=True,
            sequence_parallel=True, pre_process=pre_process, post_process=post_process,
        )
        if post_process:
            self.final_norm = nn.LayerNorm(t.width, eps=cfg.layernorm_eps)
            self.proj = nn.Linear(t.width, cfg.embed_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=t.width ** -0.5)
        self._input_tensor = None

    # pipeline hook (megatron schedules call this on every stage but the first)
    def set_input_tensor(self, tensor):
        self._input_tensor = tensor
        self.block.set_input_tensor(tensor)  # a block without pre_process reads its input from here

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, prefix + N, W) token embeddings with position embedding."""
        cfg = self.cfg
        if latents.dim() != 4 or latents.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"encoder expects latents (B, {cfg.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        h, w = latents.shape[-2:]
        if h != w or h % cfg.patch_size:
            raise ValueError(f"latent grid must be square and divisible by {cfg.patch_size}, got {h}x{w}")
        x = self.patch_embed(latents.to(self.patch_embed.weight.dtype))  # (B, W, g, g)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if cfg.position_embedding_type == "learned":
            pos = resize_table(self.pos_embed, grid).to(x.dtype)
        else:
            pos = sincos_2d(x.shape[-1], grid, cfg.pos_embed_ref_grid, device=x.device, dtype=x.dtype)
        x = x + pos[None]
        prefix = []
        if self.class_token is not None:
            cls = self.class_token
            if getattr(self, "class_pos_embed", None) is not None:
                cls = cls + self.class_pos_embed.to(cls.dtype)
            prefix.append(cls.expand(x.shape[0], -1, -1))
        if self.registers is not None:
            prefix.append(self.registers.expand(x.shape[0], -1, -1))
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        return x

    def forward(self, latents: Optional[torch.Tensor] = None, output_hidden_states: bool = False):
        """With ``post_process``: an :class:`EncoderOutput`. Otherwise (a pipeline stage before the last) the
        block output in megatron's ``[s, b, h]`` layout, which is what the pipeline schedule sends on; stages
        after the first read their input (also ``[s, b, h]``) from :meth:`set_input_tensor`."""
        if self.pre_process:
            x = scatter_sequence(self.block, self.embed(latents).transpose(0, 1).contiguous())
        else:
            x = self._input_tensor
        hidden = [gather_sequence(self.block, x).transpose(0, 1)] if output_hidden_states else None
        with capture_layer_outputs(self.block, enabled=output_hidden_states) as outs:
            x = self.block(x, attention_mask=None)
        if not self.post_process:
            return x  # with sequence parallelism: this TP rank's share of the sequence, as the schedule expects
        if hidden is not None:
            hidden.extend(o.transpose(0, 1) for o in outs)
        return self.head(gather_sequence(self.block, x).transpose(0, 1), hidden)

    def head(self, x: torch.Tensor, hidden_states=None) -> EncoderOutput:
        cfg = self.cfg
        tokens = x[:, cfg.num_prefix_tokens:]
        if cfg.final_ln_after_pool:
            pooled = self.final_norm(tokens.mean(dim=1))
        else:
            tokens = self.final_norm(tokens)
            pooled = tokens.mean(dim=1)
        return EncoderOutput(
            tokens=tokens, pooled=pooled, embedding=self.proj(pooled), hidden_states=hidden_states,
            num_prefix_tokens=cfg.num_prefix_tokens,
        )
