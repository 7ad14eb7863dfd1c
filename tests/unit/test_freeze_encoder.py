"""--freeze-encoder: a reconstruction-only fine-tune. Only the ViT decoder trains (the optimizer holds nothing
else), the understanding losses are not computed, the encoder gets no gradient, and the step still lowers the
reconstruction loss; the encoder's token RMS is reported in every step."""
import pytest
import torch


def test_only_the_decoder_trains(mp1):
    from helpers import random_batch, tiny_model

    from megatron_ov3.training.optim import param_groups

    model = tiny_model(image_size=32, freeze_encoder=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("latent_decoder.") for n in trainable)
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=3e-3)
    batch = random_batch(4, image_size=32, vocab=model.cfg.vocab_size)
    losses = []
    for _ in range(8):
        out = model(batch)
        assert "contrastive_loss" not in out and "caption_loss" not in out and "encoder_token_rms" in out
        opt.zero_grad()
        out["total_loss"].backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("latent_decoder."))
        opt.step()
        losses.append(float(out["total_loss"]))
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("latent_decoder."), n


def test_token_rms_is_the_encoder_output_rms(mp1):
    from helpers import random_batch, tiny_model

    model = tiny_model(image_size=32).eval()
    batch = random_batch(2, image_size=32, vocab=model.cfg.vocab_size)
    out = model(batch)
    tokens = model.encode_image(images=batch["images"]).tokens
    assert abs(float(out["encoder_token_rms"]) - float(tokens.pow(2).mean().sqrt())) < 1e-5


def test_freeze_encoder_refuses_pipeline_parallelism():
    from megatron_ov3.config.job import ParallelConfig
    from megatron_ov3.errors import UsageError
    from megatron_ov3.models import get_config

    with pytest.raises(UsageError, match="--freeze-encoder trains the decoder only"):
        ParallelConfig(pipeline_model_parallel_size=2).validate(2, get_config("tiny", freeze_encoder=True))
