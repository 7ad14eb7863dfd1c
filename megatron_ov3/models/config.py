"""Model configuration: one dataclass per concern, each field documented, validated at construction.

* :class:`TowerConfig` — the shape of one transformer stack (width / depth / MLP / heads).
* :class:`OV3Config` — what the OV3 model *is*: its four towers, token layout, text lengths, loss weights.
* :class:`LayerImplConfig` — how the layers are *realised*: layer backend (local / Transformer Engine),
  attention kernel, parameter dtype, FP8, sequence parallelism, activation recomputation. The training
  entry point fills it from flags; the model code passes it to the spec builder and never branches on it.

Invalid values raise :class:`ConfigError` (a ``ValueError``) whose message names the field and the fix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import UsageError
from ..losses import CONTRASTIVE_TEXTS
from ..options import cli


BACKENDS = ("auto", "local", "te")
"""Layer backends: megatron-core's local modules, Transformer Engine, or TE when it imports."""
ATTENTIONS = ("sdpa", "unfused")
"""Core attention of the local backend: torch's fused SDPA kernels or megatron's unfused softmax."""


class ConfigError(UsageError):
    """An invalid configuration value; the message names the field and how to fix it."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class TowerConfig:
    """Shape of one transformer stack (big_vision naming: width / depth / MLP / heads)."""

    width: int
    """Hidden size of every token."""
    depth: int
    """Number of transformer layers."""
    mlp: int
    """Hidden size of the MLP inside each layer."""
    heads: int
    """Number of attention heads; must divide ``width``."""

    def validate(self, name: str) -> None:
        for f in ("width", "depth", "mlp", "heads"):
            _require(getattr(self, f) > 0, f"{name}.{f} must be positive, got {getattr(self, f)}")
        _require(
            self.width % self.heads == 0,
            f"{name}.heads={self.heads} does not divide {name}.width={self.width}; "
            f"pick heads among the divisors of {self.width}",
        )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


NOISE_NORMS = ("layernorm", "none")
CAPTION_PREFIXES = ("image", "alt")


@dataclass
class OV3Config:
    """The OpenVision 3 model: frozen VAE -> latent ViT encoder -> {ViT decoder, text tower, caption decoder}."""

    encoder: TowerConfig
    """The latent ViT encoder (the product: the tower LLaVA and RAE consume)."""
    decoder: TowerConfig
    """ViT decoder that predicts VAE latents from (noised) encoder tokens, for the reconstruction loss."""
    text: TowerConfig
    """CLIP-style text encoder for the contrastive loss."""
    caption: TowerConfig
    """Caption decoder: causal transformer over [projected image tokens; caption tokens] (prefix fusion)."""
    embed_dim: int
    """Width of the shared image/text embedding used by the contrastive loss."""
    size: str = field(default="custom", metadata=cli("--model-size"))
    """Registry name this config came from (informational)."""

    # --- image / latent / tokens ---
    image_size: int = field(default=256, metadata=cli())
    """Training resolution in pixels (square). Must be a multiple of 16 (VAE 8x times patch 2)."""
    latent_channels: int = 16
    """Channels of the VAE latent (16 for the FLUX.1 VAE)."""
    vae_downsample: int = 8
    """Spatial downsampling of the VAE (8 for FLUX.1)."""
    patch_size: int = 2
    """Patch size over the latent; one token covers vae_downsample*patch_size pixels (16)."""
    class_token: bool = field(default=False, metadata=cli())
    """Prepend a learned class token. Off by default: pooling is GAP, and without it the token count
    (N = (image_size/16)^2 = 64 at 128px, 256 at 256px) is a multiple of 16 as FP8 GEMMs want. Turn it on to
    import/export the official OV3 open_clip checkpoints, which have one."""
    register_tokens: int = field(default=0, metadata=cli())
    """Number of learned register tokens prepended after the class token (excluded from pooling)."""
    pos_embed_ref_grid: int = field(default=16, metadata=cli())
    """Token grid at which the fixed sincos-2d position embedding uses integer positions. Other grids sample
    the same continuous embedding at scaled positions, so 128px (8x8) and 256px (16x16) cover the same
    spatial extent and any resolution in between works without re-learning. With ``position_embedding_type``
    'learned' it is the grid of the learned table (other grids resize it bicubically, as open_clip does).
    The reconstruction decoder's fixed sincos embedding uses the same reference grid."""
    position_embedding_type: str = field(default="sincos", metadata=cli(choices=("sincos", "learned")))
    """Encoder position embedding: 'sincos' (fixed, resolution-agnostic; default) or 'learned' (a trainable
    ``pos_embed_ref_grid``^2 x width table initialised to the sincos table, plus a learned class-token
    position when ``class_token``; the layout of open_clip checkpoints such as the official OV3 release)."""
    final_ln_after_pool: bool = True
    """Apply the encoder's final LayerNorm to the pooled vector only (OpenVision/open_clip convention: the
    returned tokens are the raw output of the last block). False: normalise the tokens, then pool."""
    layernorm_eps: float = 1e-6
    """LayerNorm epsilon of every tower (OpenVision uses 1e-6)."""

    # --- reconstruction branch ---
    decoder_noise_tau: float = field(default=0.8, metadata=cli(low=0))
    """Training-time noise on encoder tokens before the decoder: sigma ~ U[0, tau] per sample (RAE uses
    0.8; the paper does not publish its value). No noise in eval mode."""
    decoder_noise_norm: str = field(default="layernorm", metadata=cli(choices=NOISE_NORMS))
    """What the decoder (and its noise) sees of the encoder tokens: 'layernorm', a parameter-free LayerNorm of
    each token first (RAE's convention: its encoders end in a LayerNorm without affine, so tau is read against
    unit-RMS tokens), or 'none', the raw last-block tokens (the noise scale then follows whatever RMS the encoder
    learns, logged as ``encoder_token_rms``; checkpoints written before this option trained so)."""

    # --- text ---
    vocab_size: int = 32000
    """Size of the sentencepiece vocabulary shared by the text encoder and the caption decoder."""
    text_context_length: int = 80
    """Token length of the text-encoder input (OpenVision: 80)."""
    caption_length: int = 128
    """Token length of the caption-decoder input (OpenVision: 128)."""
    contrastive_texts: str = field(default="alt", metadata=cli())
    """The texts each image is scored against, comma-separated, one text-tower pass and one contrastive loss each
    (averaged): 'alt' (the alt-text), 'recap-sentence' (one random sentence of the recaption, CLIPS' sub-caption),
    'alt-or-recap-sentence' (either, per sample). OpenVision scores both: 'alt,recap-sentence'. One-caption data
    feeds its caption to every text."""
    caption_prefix: str = field(default="image", metadata=cli(choices=CAPTION_PREFIXES))
    """What the caption decoder conditions on: 'image' (the encoder tokens) or 'alt' (the encoder tokens, then the
    text encoder's tokens of the alt-text, the first of ``contrastive_texts``; OpenVision's decoder)."""
    pad_id: int = 0
    """Token id used for padding; padded caption positions carry no loss, text pooling ignores them."""

    # --- losses (paper defaults: L = 0.5*(pixel + 0.4*latent + lpips_w*lpips) + caption + contrastive) ---
    reconstruction_weight: float = field(default=0.5, metadata=cli(low=0))
    """Weight of the whole reconstruction loss L_rec in the total."""
    pixel_l1_weight: float = field(default=1.0, metadata=cli(low=0))
    """Weight of the pixel L1 (through the frozen VAE decoder) inside L_rec."""
    latent_l1_weight: float = field(default=0.4, metadata=cli(low=0))
    """Weight of the latent L1 inside L_rec."""
    lpips_weight: float = field(default=0.0, metadata=cli(low=0))
    """Weight of LPIPS inside L_rec (paper: 0 in pre-training, 0.5 in fine-tuning). >0 needs lpips_path."""
    pixel_loss_fraction: float = field(default=1.0, metadata=cli(low=0, high=1, low_open=True))
    """Fraction of each micro batch (its first ceil(f*B) samples) whose predicted latents are decoded for the
    pixel L1/LPIPS losses. 1.0 is the paper's full pixel loss; below 1 is a documented deviation that cuts
    the VAE-decode cost (the dominant one) proportionally; the latent L1 still covers every sample."""
    lpips_path: Optional[str] = field(default=None, metadata=cli())
    """Local file with LPIPS (VGG) weights; required when lpips_weight > 0."""
    caption_weight: float = field(default=1.0, metadata=cli(low=0))
    """Weight of the captioning cross-entropy."""
    contrastive_weight: float = field(default=1.0, metadata=cli(low=0))
    """Weight of the CLIP contrastive loss."""
    freeze_encoder: bool = field(default=False, metadata=cli())
    """Reconstruction-only fine-tune (as RAE and the paper's generation experiments need): the encoder, the text
    tower, the caption decoder and the logit scale are frozen (no gradients, no optimizer state) and the
    understanding losses are not computed; only the ViT decoder trains, on latent/pixel L1 (+ LPIPS). Start it
    from a trained run with ``--finetune-from``."""
    logit_scale_init: float = 1.0 / 0.07
    """Initial contrastive temperature scale (learned as its log)."""
    logit_scale_max: float = 100.0
    """Upper clamp of the learned logit scale."""

    def __post_init__(self):
        for name in ("encoder", "decoder", "text", "caption"):
            tower = getattr(self, name)
            if isinstance(tower, dict):
                tower = TowerConfig(**tower)
                setattr(self, name, tower)
            tower.validate(name)
        _require(self.embed_dim > 0, f"embed_dim must be positive, got {self.embed_dim}")
        token_px = self.vae_downsample * self.patch_size
        _require(
            self.image_size > 0 and self.image_size % token_px == 0,
            f"image_size={self.image_size} is not a multiple of {token_px} (VAE {self.vae_downsample}x times "
            f"patch {self.patch_size}); use e.g. 128, 224 or 256",
        )
        _require(self.register_tokens >= 0, f"register_tokens must be >= 0, got {self.register_tokens}")
        _require(self.position_embedding_type in ("sincos", "learned"),
                 f"position_embedding_type must be 'sincos' or 'learned', got {self.position_embedding_type!r}")
        _require(self.pos_embed_ref_grid > 0, f"pos_embed_ref_grid must be positive, got {self.pos_embed_ref_grid}")
        _require(self.decoder_noise_tau >= 0, f"decoder_noise_tau must be >= 0, got {self.decoder_noise_tau}")
        _require(self.decoder_noise_norm in NOISE_NORMS,
                 f"decoder_noise_norm {self.decoder_noise_norm!r} unknown; use one of {', '.join(NOISE_NORMS)}")
        texts = self.contrastive_texts_list
        _require(0 < len(texts) <= 2 and all(t in CONTRASTIVE_TEXTS for t in texts) and len(set(texts)) == len(texts),
                 f"--contrastive-texts {self.contrastive_texts!r}: give one or two different texts of "
                 f"{', '.join(CONTRASTIVE_TEXTS)}, comma-separated (e.g. alt,recap-sentence)")
        _require(self.caption_prefix in CAPTION_PREFIXES,
                 f"caption_prefix {self.caption_prefix!r} unknown; use one of {', '.join(CAPTION_PREFIXES)}")
        _require(self.caption_prefix != "alt" or texts[0] == "alt",
                 f"--caption-prefix alt conditions on the alt-text's text-tower pass, but --contrastive-texts "
                 f"{self.contrastive_texts!r} does not start with alt; e.g. --contrastive-texts alt,recap-sentence")
        _require(self.vocab_size > 1, f"vocab_size must be > 1, got {self.vocab_size}")
        _require(self.text_context_length > 1, "text_context_length must be > 1")
        _require(self.caption_length > 1, "caption_length must be > 1")
        _require(0 <= self.pad_id < self.vocab_size, f"pad_id={self.pad_id} must lie in [0, vocab_size)")
        for f in ("reconstruction_weight", "pixel_l1_weight", "latent_l1_weight", "lpips_weight",
                  "caption_weight", "contrastive_weight"):
            _require(getattr(self, f) >= 0, f"{f} must be >= 0, got {getattr(self, f)}")
        _require(
            self.lpips_weight == 0 or self.lpips_path,
            "lpips_weight > 0 needs lpips_path (a local LPIPS weights file); set it or set lpips_weight 0",
        )
        _require(0 < self.pixel_loss_fraction <= 1,
                 f"pixel_loss_fraction must lie in (0, 1], got {self.pixel_loss_fraction}")
        _require(self.logit_scale_init > 0, "logit_scale_init must be > 0")
        _require(self.logit_scale_max >= self.logit_scale_init, "logit_scale_max must be >= logit_scale_init")

    # --- derived ---
    @property
    def contrastive_texts_list(self) -> list:
        return [t.strip() for t in self.contrastive_texts.split(",")]

    @property
    def grid_size(self) -> int:
        """Token grid side at ``image_size``."""
        return self.image_size // (self.vae_downsample * self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.register_tokens

    @property
    def pixels_per_token(self) -> int:
        return self.vae_downsample * self.patch_size

    @property
    def seq_length(self) -> int:
        """Tokens the encoder's transformer sees per image: patches plus class/register tokens. The one
        formula every consumer (training, FLOPs, planner, export, benchmark) uses."""
        return self.num_patches + self.num_prefix_tokens

    def tokens_at(self, image_size: int) -> int:
        """Patch tokens (no prefix) at another resolution, e.g. for a planner sweep."""
        return (image_size // self.pixels_per_token) ** 2

    def replace(self, **changes) -> "OV3Config":
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, d: dict) -> "OV3Config":
        """The config a checkpoint or export saved (complete; older ones included, see :func:`saved_config`)."""
        return cls.from_dict(saved_config(d))

    @classmethod
    def from_dict(cls, d: dict) -> "OV3Config":
        known = {f.name for f in dataclasses.fields(cls)}
        d = current_names(d)
        unknown = sorted(set(d) - known)
        _require(not unknown, f"unknown OV3Config fields {unknown}; remove them (known: {sorted(known)})")
        return cls(**d)


@dataclass
class LayerImplConfig:
    """How transformer layers are realised. Filled from the job configuration; the model passes it through."""

    transformer_impl: str = field(default="auto", metadata=cli(choices=("auto", "local", "te")))
    """Layer backend: 'te' (Transformer Engine), 'local' (megatron-core modules) or 'auto' (te if importable)."""
    attention_backend: str = field(default="sdpa", metadata=cli(choices=("sdpa", "unfused")))
    """Core attention of the local backend: 'sdpa' (torch fused kernels) or 'unfused' (megatron's softmax)."""
    bf16: bool = field(default=False, metadata=cli())
    """bf16 parameters and megatron layers in bf16 mode (DeepSpeed's bf16 engine keeps fp32 masters); off:
    fp32 everywhere."""
    fp8_format: Optional[str] = field(default=None, metadata=cli(choices=("hybrid", "e4m3")))
    """FP8 GEMMs in the transformer layers: None, 'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3'. With
    transformer_impl te, Transformer Engine's FP8 inside the layers; with local, torchao float8 GEMMs applied
    around the model by :mod:`megatron_ov3.converters` (emulated on CPU)."""
    sequence_parallel: bool = field(default=False, metadata=cli())
    """Megatron sequence parallelism in the image encoder and decoder (needs tensor parallelism > 1)."""
    recompute_granularity: Optional[str] = field(default=None, metadata=cli(choices=("full", "selective")))
    """Activation recomputation: None, 'full' (whole layers) or 'selective' (core attention only)."""
    recompute_num_layers: int = 1
    """With 'full' recomputation: layers per recomputed chunk (uniform method)."""
    init_method_std: float = 0.02
    """Std of the normal init of transformer weights."""
    torch_compile: bool = field(default=False, metadata=cli())
    """``torch.compile`` each transformer layer, in place (applied around the model by
    :mod:`megatron_ov3.converters`; checkpoints unchanged)."""
    tf32: bool = field(default=True, metadata=cli())
    """On a GPU, fp32 matmuls and convolutions (fp32 runs, the frozen VAE, the loss heads) on TF32 tensor cores,
    as open_clip and timm train; ``--no-tf32`` keeps them in full fp32. bf16 and FP8 GEMMs are unaffected."""

    def __post_init__(self):
        _require(self.transformer_impl in BACKENDS,
                 f"transformer_impl {self.transformer_impl!r} unknown; use one of {BACKENDS}")
        _require(self.attention_backend in ATTENTIONS,
                 f"attention_backend {self.attention_backend!r} unknown; use one of {ATTENTIONS}")
        _require(self.fp8_format in (None, "hybrid", "e4m3"),
                 f"fp8_format {self.fp8_format!r} unknown; use hybrid or e4m3")
        _require(
            self.recompute_granularity in (None, "full", "selective"),
            f"recompute_granularity {self.recompute_granularity!r} unknown; use full or selective",
        )
        _require(self.recompute_num_layers >= 1, "recompute_num_layers must be >= 1")

    @property
    def params_dtype(self) -> torch.dtype:
        """Dtype of the transformer parameters (derived from ``bf16``: one switch for precision)."""
        return torch.bfloat16 if self.bf16 else torch.float32


LEGACY_NAMES = {"pos_embed_type": "position_embedding_type"}
"""Model-config field names before 2026-12 -> today's (checkpoints written then keep loading)."""


LEGACY_VALUES = {"decoder_noise_norm": "none"}
"""Fields added after 2026-12-07 -> the value runs saved before then trained with (a complete saved config that
lacks one is read with this, not today's default)."""


def current_names(d: dict) -> dict:
    """A copy of a (possibly partial) saved model-config dict with today's field names."""
    d = dict(d)
    for old, new in LEGACY_NAMES.items():
        if old in d:
            d.setdefault(new, d.pop(old))
    return d


def saved_config(d: dict) -> dict:
    """A complete model config as a checkpoint or export saved it, in today's names and with the values of
    fields it predates (:data:`LEGACY_VALUES`)."""
    d = current_names(d)
    for name, value in LEGACY_VALUES.items():
        d.setdefault(name, value)
    return d


def pixel_loss_samples(fraction: float, batch: int) -> int:
    """How many samples of a micro batch of ``batch`` the pixel loss decodes: ceil(fraction x batch), with
    float noise removed (0.07 x 100 is 7, not 8), at least 1. The model, the FLOP count and the benchmark share
    it."""
    return max(1, math.ceil(round(fraction * batch, 6)))
