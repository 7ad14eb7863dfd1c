"""Text side of OV3: a CLIP-style text encoder and a caption decoder.

Caption decoder design — **prefix fusion** (OpenVision/CapPa style), not CoCa cross-attention:
the image tokens are projected to the decoder width and put in front of the caption tokens, and one causal
transformer runs over ``[image tokens; caption tokens]``. Why:

* it is what OpenVision (the code base OV3 comes from) does, so results are comparable to the paper;
* it reuses the exact same self-attention layer spec as every other tower, so tensor/pipeline parallelism,
  Transformer Engine, FP8 and recomputation apply to it unchanged (CoCa needs a second, cross-attention spec);
* a plain causal mask (no mask tensor) runs in flash/TE causal kernels; the image tokens already saw each
  other bidirectionally in the encoder, so causality among them costs nothing;
* with N image tokens (a multiple of 16) + 128 caption tokens the sequence stays FP8-friendly.
The cost is that the decoder's MLPs also run over the N image tokens; the caption tower is the smallest
of the four, so this is a small fraction of the step (see the FLOP count in models/accounting.py).

Vocabulary: embeddings and the LM head are vocab-parallel (megatron-core), padded to a multiple of 128.
"""
from __future__ import annotations

import torch
from torch import nn
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

from .config import ConfigError, LayerImplConfig, OV3Config
from .transformer import build_block, run_block


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Vocabulary rounded up to ``multiple`` (the tensor-parallel size must divide the result)."""
    return -(-vocab_size // multiple) * multiple


def _check_vocab(cfg: OV3Config, tp: int) -> int:
    v = padded_vocab_size(cfg.vocab_size)
    if v % tp:
        raise ConfigError(f"padded vocab {v} is not divisible by --tensor-model-parallel-size {tp}")
    return v


def _init_normal(std):
    return lambda w: nn.init.normal_(w, std=std)


class TextEncoder(nn.Module):
    """Token + learned position embedding -> bidirectional block -> LayerNorm at the EOS (last non-pad)
    token -> bias-free projection to the shared embedding."""

    def __init__(self, cfg: OV3Config, impl: LayerImplConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.block = build_block(t, impl, causal=False, eps=cfg.layernorm_eps, name="text")
        tp = self.block.config.tensor_model_parallel_size
        self.token_embedding = VocabParallelEmbedding(
            _check_vocab(cfg, tp), t.width, init_method=_init_normal(0.02), config=self.block.config
        )
        self.pos_embedding = nn.Parameter(torch.randn(cfg.text_context_length, t.width) * 0.01)
        self.final_norm = nn.LayerNorm(t.width, eps=cfg.layernorm_eps)
        self.proj = nn.Linear(t.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=t.width ** -0.5)

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, L <= text_context_length -> (B, E) text embedding (not L2-normalised)."""
        return self.forward_with_tokens(text_ids)[0]

    def forward_with_tokens(self, text_ids: torch.Tensor):
        """(embedding (B, E), the block's output tokens (B, L, W_text)): the tokens are what the caption decoder
        reads as its alt-text prefix (``caption_prefix`` 'alt')."""
        b, length = text_ids.shape
        if length > self.cfg.text_context_length:
            raise ValueError(f"text has {length} tokens, more than text_context_length={self.cfg.text_context_length}")
        x = self.token_embedding(text_ids) + self.pos_embedding[:length]
        x = run_block(self.block, x)
        nonpad = (text_ids != self.cfg.pad_id).long()
        # index of the last non-pad token (0 for an all-pad row)
        idx = (nonpad * torch.arange(1, length + 1, device=text_ids.device)).argmax(dim=1)
        pooled = x[torch.arange(b, device=x.device), idx]
        return self.proj(self.final_norm(pooled)), x


class CaptionDecoder(nn.Module):
    """Prefix-fusion caption decoder: causal transformer over [proj(image tokens); caption tokens]."""

    def __init__(self, cfg: OV3Config, impl: LayerImplConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.caption
        self.block = build_block(t, impl, causal=True, eps=cfg.layernorm_eps, name="caption")
        tp = self.block.config.tensor_model_parallel_size
        vocab = _check_vocab(cfg, tp)
        self.image_proj = nn.Linear(cfg.encoder.width, t.width)
        self.text_proj = nn.Linear(cfg.text.width, t.width) if cfg.caption_prefix == "alt" else None
        self.token_embedding = VocabParallelEmbedding(
            vocab, t.width, init_method=_init_normal(0.02), config=self.block.config
        )
        self.pos_embedding = nn.Parameter(torch.randn(cfg.caption_length, t.width) * 0.01)
        self.final_norm = nn.LayerNorm(t.width, eps=cfg.layernorm_eps)
        self.lm_head = ColumnParallelLinear(
            t.width, vocab, config=self.block.config, init_method=_init_normal(0.02), bias=False,
            gather_output=False,
        )

    def forward(self, image_tokens: torch.Tensor, caption_ids: torch.Tensor, text_tokens=None):
        """Teacher-forced captioning. Returns ``(loss, num_target_tokens)``: mean cross-entropy over the
        caption's non-pad tokens. The prefix is the projected image tokens, then (``caption_prefix`` 'alt') the
        projected text-encoder tokens ``text_tokens`` (B, L_text, W_text) of the alt-text; the last prefix
        position predicts caption token 0, caption position j predicts token j+1; the last caption position
        predicts nothing."""
        length = caption_ids.shape[1]
        if length > self.cfg.caption_length:
            raise ValueError(f"caption has {length} tokens, more than caption_length={self.cfg.caption_length}")
        if (text_tokens is None) != (self.text_proj is None):
            raise ValueError(f"caption_prefix {self.cfg.caption_prefix!r} and the text tokens given disagree")
        prefix = [self.image_proj(image_tokens)]
        if text_tokens is not None:
            prefix.append(self.text_proj(text_tokens).to(prefix[0].dtype))
        prefix = torch.cat(prefix, dim=1) if len(prefix) > 1 else prefix[0]
        n = prefix.shape[1]
        txt = self.token_embedding(caption_ids) + self.pos_embedding[:length]
        x = run_block(self.block, torch.cat([prefix, txt.to(prefix.dtype)], dim=1))
        x = self.final_norm(x[:, n - 1 : n - 1 + length])  # positions that predict caption tokens 0..L-1
        logits, _ = self.lm_head(x.transpose(0, 1).contiguous())  # [L, B, V/tp]
        target = caption_ids.transpose(0, 1).contiguous()
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)
        mask = (target != self.cfg.pad_id).float()
        count = mask.sum()
        return (per_token * mask).sum() / count.clamp(min=1.0), count
