"""The OV3 model: one shared image representation trained by reconstruction and by language.

::

    images [-1,1] --(frozen VAE encode; skipped for latent shards)--> z (B,16,H/8,W/8)
    z --> LatentViTEncoder --> tokens u (B,N,W), pooled embedding e_img
       u --(+ sigma*eps, train only)--> LatentDecoder --> z_hat --> latent_l1 = |z_hat - z|
                                             z_hat --(frozen VAE decode, with grad)--> x_hat --> pixel_l1, lpips
       e_img, TextEncoder(text_ids) --> contrastive_loss (gather over the data-parallel group)
       u, caption_ids --> CaptionDecoder --> caption_loss
    total = rec_w * (pixel_w*pixel_l1 + latent_w*latent_l1 + lpips_w*lpips) + cap_w*caption + con_w*contrastive

The frozen VAE (and LPIPS) are *not* submodules: they own no trainable state, are not saved in checkpoints,
are not seen by optimizers or ZeRO partitioning, and keep their own dtype. Move them with :meth:`to_frozen`.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from megatron.core.enums import ModelType
from torch import nn

from ..losses import TEXT_KEYS, EmbeddingPool, l1, pooled_contrastive_loss
from .config import LayerImplConfig, OV3Config, pixel_loss_samples
from .decoder import LatentDecoder
from .encoder import EncoderOutput, LatentViTEncoder
from .lpips import LPIPS
from .stages import stage_layout
from .text import CaptionDecoder, TextEncoder
from .vae import FrozenVAE
from ..errors import UsageError

LOSS_NAMES = ("contrastive_loss", "caption_loss", "latent_l1", "pixel_l1", "lpips")


class OV3Model(nn.Module):
    def __init__(
        self,
        cfg: OV3Config,
        impl: Optional[LayerImplConfig] = None,
        vae: Optional[FrozenVAE] = None,
        pre_process: bool = True,
        post_process: bool = True,
        dp_group_fn=None,
    ):
        """``vae``: the frozen VAE (required to train from images and for the pixel loss).
        ``dp_group_fn``: returns the data-parallel group for the contrastive loss (default: megatron's)."""
        super().__init__()
        impl = impl or LayerImplConfig()
        self.cfg, self.impl = cfg, impl
        self.pre_process, self.post_process = pre_process, post_process
        if vae is not None and vae.latent_channels != cfg.latent_channels:
            raise UsageError(
                f"VAE has {vae.latent_channels} latent channels but the model expects {cfg.latent_channels}"
            )
        if vae is not None and vae.downsample != cfg.vae_downsample:
            raise UsageError(f"VAE downsamples {vae.downsample}x but the model expects {cfg.vae_downsample}x")
        object.__setattr__(self, "vae", vae)
        object.__setattr__(self, "lpips", LPIPS.from_file(cfg.lpips_path) if cfg.lpips_weight > 0 else None)
        if dp_group_fn is None:
            from ..parallel import data_parallel_group as dp_group_fn
        self._dp_group_fn = dp_group_fn

        self.encoder = LatentViTEncoder(cfg, impl, pre_process=pre_process, post_process=post_process)
        # what megatron's pipeline schedules read (get_model_config / model_type)
        self.config = self.encoder.block.config
        self.model_type = ModelType.encoder_or_decoder
        if post_process:
            # not named `decoder`: megatron's pipeline schedules treat `model.decoder` as a GPT TransformerBlock
            self.latent_decoder = LatentDecoder(cfg, impl)
            self.text = TextEncoder(cfg, impl)
            self.caption = CaptionDecoder(cfg, impl)
            # shape (1,), not 0-dim: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors refuse
            self.logit_scale = nn.Parameter(torch.tensor([math.log(cfg.logit_scale_init)]))
        if cfg.freeze_encoder:
            for name, tower in self.named_children():
                if name != "latent_decoder":
                    tower.requires_grad_(False)
            if post_process:
                self.logit_scale.requires_grad_(False)

    # ---- frozen companions ----
    def to_frozen(self, device=None, dtype=None) -> "OV3Model":
        """Move the frozen VAE / LPIPS (not submodules) to ``device`` and optionally cast the VAE."""
        for m in (self.vae, self.lpips):
            if m is not None:
                m.to(device=device, dtype=dtype if m is self.vae else None)
        return self

    def set_input_tensor(self, tensor):
        self.encoder.set_input_tensor(tensor[0] if isinstance(tensor, (list, tuple)) else tensor)

    # ---- pieces ----
    def latents_of(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised VAE latents of a batch: given (latent shards) or encoded by the frozen VAE."""
        if batch.get("latents") is not None:
            return batch["latents"].float()
        if self.vae is None:
            raise ValueError("batch has images but the model has no VAE; pass vae=FrozenVAE(...) or latent shards")
        return self.vae.encode(batch["images"])

    def encode_image(self, images=None, latents=None, output_hidden_states: bool = False) -> EncoderOutput:
        """Encoder only (the exported tower): images in [-1, 1] or precomputed latents."""
        if latents is None:
            latents = self.latents_of({"images": images})
        return self.encoder(latents, output_hidden_states=output_hidden_states)

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.text(text_ids)

    def reconstruct(self, images=None, latents=None):
        """(predicted latents, decoded images) without noise; for evaluation and export checks."""
        z = latents if latents is not None else self.latents_of({"images": images})
        z_hat = self.predict_latents(self.encoder(z).tokens)
        return z_hat, (self.vae.decode(z_hat) if self.vae is not None else None)

    def current_logit_scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)[0]

    # ---- optimizer facts ----
    DECAYED_LAYERS = ("Linear", "Conv")
    """Class-name fragments of the layers whose weight matrices AdamW decays (torch ``nn.Linear``/``nn.Conv2d``,
    megatron's ``ColumnParallelLinear``/``RowParallelLinear``, Transformer Engine's ``Linear``/``LayerNormLinear``):
    as big_vision/OpenVision decay every Dense/Conv kernel and nothing else."""

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """Whether AdamW's weight decay skips this parameter (the model names them; the optimizer asks): all but
        the weight matrices of linear and convolution layers, so biases, norms, the logit scale, token
        embeddings, position tables, class and register tokens are exempt."""
        if not hasattr(self, "_decayed"):
            self._decayed = {
                id(p) for module in self.modules() if any(k in type(module).__name__ for k in self.DECAYED_LAYERS)
                for pname, p in module.named_parameters(recurse=False) if pname == "weight" and p.dim() >= 2}
        return id(param) not in self._decayed

    # ---- training forward, in public sub-steps (the benchmark and evaluation call these) ----
    def reconstruction_losses(self, tokens: torch.Tensor, z: torch.Tensor,
                              batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Noise-augmented ViT decoder -> latent L1, and through the frozen VAE decoder pixel L1 (+ LPIPS).
        Returns the named losses and ``reconstruction_loss`` (their weighted sum, before ``reconstruction_weight``)."""
        cfg = self.cfg
        z_hat = self.predict_latents(tokens, batch.get("noise_seeds"))
        out = {"latent_l1": l1(z_hat, z)}
        rec = cfg.latent_l1_weight * out["latent_l1"]
        if cfg.pixel_l1_weight > 0 or cfg.lpips_weight > 0:
            x_hat, x = self.decode_prediction(z_hat), self.pixel_target(z, batch.get("images"))
            out["pixel_l1"] = l1(x_hat, x)
            rec = rec + cfg.pixel_l1_weight * out["pixel_l1"]
            if self.lpips is not None:
                out["lpips"] = self.lpips(x_hat.float(), x.float()).mean()
                rec = rec + cfg.lpips_weight * out["lpips"]
        out["reconstruction_loss"] = rec
        return out

    def predict_latents(self, tokens: torch.Tensor, noise_seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ViT decoder's latent prediction from encoder tokens (noise-augmented in train mode)."""
        return self.latent_decoder(tokens, noise_seeds)

    def _pixel_samples(self, batch: int) -> int:
        if self.vae is None:
            raise ValueError("the pixel loss needs the VAE decoder; pass vae=FrozenVAE(...) or set pixel_l1_weight 0")
        return pixel_loss_samples(self.cfg.pixel_loss_fraction, batch)  # all unless a deviation is asked

    def decode_prediction(self, z_hat: torch.Tensor) -> torch.Tensor:
        """Predicted latents of the pixel-loss share of the batch through the frozen VAE decoder, with grad."""
        return self.vae.decode(z_hat[:self._pixel_samples(z_hat.shape[0])])

    def pixel_target(self, z: torch.Tensor, images: Optional[torch.Tensor]) -> torch.Tensor:
        """The pixel-loss target of that share: the images, or (latent shards carry no pixels) the VAE's own
        reconstruction of the given latents."""
        k = self._pixel_samples(z.shape[0])
        if images is None:
            with torch.no_grad():
                return self.vae.decode(z[:k])
        return images[:k]

    def text_embeddings(self, batch: Dict[str, torch.Tensor]):
        """(embeddings, token states) of each contrastive text (:data:`~megatron_ov3.losses.TEXT_KEYS`)."""
        return [self.text.forward_with_tokens(batch[k]) for k in TEXT_KEYS if k in batch]

    def pool_embeddings(self, enc: EncoderOutput, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What an :class:`~megatron_ov3.losses.EmbeddingPool` holds of one micro-batch (computed without
        gradients before the accumulation window): the image embedding and each text's."""
        texts = self.text_embeddings(batch)
        return {"image": enc.embedding.detach(), **{f"text{i}": e.detach() for i, (e, _) in enumerate(texts)}}

    def contrastive_losses(self, enc: EncoderOutput, batch: Dict[str, torch.Tensor], texts=None
                           ) -> Dict[str, torch.Tensor]:
        """Text tower + CLIP contrastive loss (gathered over the data-parallel group; over the accumulation window
        too when the batch carries its ``contrastive_pool``; averaged over the contrastive texts)."""
        scale = self.current_logit_scale()
        texts = texts if texts is not None else self.text_embeddings(batch)
        pool: Optional[EmbeddingPool] = batch.get("contrastive_pool")
        con, acc_i2t, acc_t2i = pooled_contrastive_loss(enc.embedding, [e for e, _ in texts], scale, pool,
                                                        self._dp_group_fn())
        return {"contrastive_loss": con, "contrastive_acc_i2t": acc_i2t, "contrastive_acc_t2i": acc_t2i,
                "logit_scale": scale.detach()}

    def caption_losses(self, enc: EncoderOutput, batch: Dict[str, torch.Tensor], texts=None
                       ) -> Dict[str, torch.Tensor]:
        """Caption decoder (prefix fusion over the encoder tokens, and the alt-text's text-encoder tokens with
        ``caption_prefix`` 'alt') cross-entropy."""
        prefix = None
        if self.cfg.caption_prefix == "alt":
            texts = texts if texts is not None else self.text_embeddings(batch)
            prefix = texts[0][1]  # the first contrastive text is the alt-text (the job's rule)
        cap, ntok = self.caption(enc.tokens, batch["caption_ids"], text_tokens=prefix)
        return {"caption_loss": cap, "caption_tokens": ntok.detach()}

    def total_loss(self, out: Dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        return (cfg.reconstruction_weight * out["reconstruction_loss"] + cfg.caption_weight * out["caption_loss"]
                + cfg.contrastive_weight * out["contrastive_loss"])

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Named losses and metrics for one micro-batch.

        ``batch``: ``images`` (B,3,H,W) in [-1,1] and/or ``latents`` (B,16,H/8,W/8); ``text_ids`` (B,80);
        ``caption_ids`` (B,128); optional ``noise_seeds`` (B,) int64 for split-invariant decoder noise,
        ``text_ids_2`` (a second contrastive text), ``contrastive_pool`` (an
        :class:`~megatron_ov3.losses.EmbeddingPool`: the loss spans the accumulation window) and ``pool_only``
        (True: return only what the pool holds of this batch, plus the ``latents`` it encoded).
        Returns ``total_loss``, each loss by name (see ``LOSS_NAMES``) and metrics (``contrastive_acc_i2t``,
        ``contrastive_acc_t2i``, ``logit_scale``, ``caption_tokens``, ``encoder_token_rms``: the RMS of the
        encoder's output tokens, the scale the decoder noise sigma ~ U[0, tau] is to be read against). With
        ``freeze_encoder`` only the reconstruction losses.
        """
        pool_only = bool(batch.get("pool_only"))
        # under pipeline parallelism the first stage needs z as input and the last as reconstruction target
        z = self.latents_of(batch) if (self.pre_process or (self.post_process and not pool_only)) else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_encoder):
            enc = self.encoder(z if self.pre_process else None)
        if not self.post_process:
            return enc  # [s, b, h] activations for the next pipeline stage
        if pool_only:
            out = self.pool_embeddings(enc, batch)
            return dict(out, latents=z.detach()) if z is not None else out
        out = self.reconstruction_losses(enc.tokens, z, batch)
        out["encoder_token_rms"] = enc.tokens.detach().float().pow(2).mean().sqrt()  # the noise sigma's reference
        if self.cfg.freeze_encoder:
            out["total_loss"] = self.cfg.reconstruction_weight * out.pop("reconstruction_loss")
            return out
        texts = self.text_embeddings(batch)
        out.update(self.contrastive_losses(enc, batch, texts))
        out.update(self.caption_losses(enc, batch, texts))
        total = self.total_loss(out)
        del out["reconstruction_loss"]
        return {"total_loss": total, **out}


def build_model(cfg: OV3Config, impl: Optional[LayerImplConfig] = None, vae: Optional[FrozenVAE] = None,
                **kw) -> OV3Model:
    """Build OV3 (this rank's pipeline stage, :func:`~megatron_ov3.models.stages.stage_layout`) for the current
    megatron parallel state (call ``parallel.initialize_model_parallel`` first)."""
    from megatron.core import parallel_state as ps

    stage = stage_layout(cfg, ps.get_pipeline_model_parallel_world_size())[ps.get_pipeline_model_parallel_rank()]
    kw.setdefault("pre_process", stage.first)
    kw.setdefault("post_process", stage.last)
    return OV3Model(cfg, impl, vae, **kw)
