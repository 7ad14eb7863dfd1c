import math

import pytest
import torch

from helpers import random_batch, tiny_model
from megatron_ov3.models import LOSS_NAMES, FrozenVAE, get_config, build_model
from megatron_ov3.models.decoder import patchify, per_sample_noise, unpatchify
from megatron_ov3.models.posemb import resize_table, sincos_2d


def test_tower_shapes(mp1):
    model = tiny_model(image_size=64)
    cfg = model.cfg
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = model.vae.encode(x)
    assert z.shape == (2, 16, 8, 8)
    enc = model.encoder(z, output_hidden_states=True)
    assert enc.tokens.shape == (2, 16, 64)
    assert enc.pooled.shape == (2, 64)
    assert enc.embedding.shape == (2, cfg.embed_dim)
    assert len(enc.hidden_states) == cfg.encoder.depth + 1
    assert all(h.shape == (2, 16, 64) for h in enc.hidden_states)
    torch.testing.assert_close(enc.hidden_states[-1], enc.tokens)  # tokens are the raw last-block output
    model.eval()
    z_hat = model.latent_decoder(enc.tokens)
    assert z_hat.shape == z.shape
    assert model.vae.decode(z_hat).shape == x.shape
    assert model.text(torch.randint(1, 512, (2, 80))).shape == (2, cfg.embed_dim)
    loss, n = model.caption(enc.tokens, torch.randint(1, 512, (2, 128)))
    assert loss.dim() == 0 and n == 256


def test_prefix_tokens_and_256px(mp1):
    model = tiny_model(image_size=256, class_token=True, register_tokens=3)
    enc = model.encoder(torch.randn(1, 16, 32, 32), output_hidden_states=True)
    assert enc.tokens.shape == (1, 256, 64)  # prefix tokens stripped
    assert enc.hidden_states[0].shape == (1, 260, 64)
    assert enc.num_prefix_tokens == 4


def test_forward_backward_losses_and_grads(mp1):
    model = tiny_model()
    model.train()
    out = model(random_batch())
    for name in ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1"):
        assert torch.isfinite(out[name]), name
    cfg = model.cfg
    expected = cfg.reconstruction_weight * (out["pixel_l1"] + 0.4 * out["latent_l1"]) + out["caption_loss"] \
        + out["contrastive_loss"]
    torch.testing.assert_close(out["total_loss"], expected)
    assert math.isclose(float(out["logit_scale"]), 1 / 0.07, rel_tol=1e-5)
    out["total_loss"].backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    vae_params = list(model.vae.parameters())
    assert vae_params and all(not p.requires_grad and p.grad is None for p in vae_params)
    # the VAE is not part of the trainable module or its checkpoint
    assert not any(k.startswith("vae") for k in model.state_dict())


def test_pixel_loss_gradient_flows_through_vae_decoder(mp1):
    vae = FrozenVAE.tiny()
    z = torch.randn(2, 16, 8, 8, requires_grad=True)
    vae.decode(z).abs().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


@pytest.mark.parametrize("options", [dict(channels_last=True, checkpoint=True), dict(compile=True)],
                         ids=["cl-ckpt", "compile"])
def test_vae_decode_fast_options_keep_values_and_gradients(mp1, options):
    """Same images and same latent gradient as the eager decode. Compiled: inductor's peak-memory reordering
    zeroed the latent gradient (models/vae.py VAE_COMPILE_OPTIONS); this is the test that catches it."""
    from megatron_ov3.models import VAEDecodeConfig

    vae = FrozenVAE.tiny()
    z = torch.randn(2, 16, 8, 8)
    ref_z = z.clone().requires_grad_(True)
    ref = vae.decode(ref_z)
    ref.square().mean().backward()
    vae.configure_decode(VAEDecodeConfig(**options))
    for _ in range(2):  # the compiled graph's first and second call
        fast_z = z.clone().requires_grad_(True)
        fast = vae.decode(fast_z)
        fast.square().mean().backward()
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast_z.grad, ref_z.grad, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in vae.parameters())


def test_pixel_loss_fraction_decodes_a_prefix_of_the_batch(mp1):
    from megatron_ov3.losses import l1

    batch = random_batch(b=4, image_size=32, vocab=512)
    full = tiny_model(image_size=32)
    half = tiny_model(image_size=32, pixel_loss_fraction=0.5)
    half.load_state_dict(full.state_dict())
    calls = []
    orig = half.vae.decode
    half.vae.decode = lambda z: calls.append(z.shape[0]) or orig(z)
    full.eval(), half.eval()  # no decoder noise: both predict the same latents
    with torch.no_grad():
        out_full, out_half = full(batch), half(batch)
        z_hat, x_hat = full.reconstruct(batch["images"])
    assert calls == [2]  # only the first ceil(0.5 * 4) predictions go through the VAE decoder
    torch.testing.assert_close(out_half["latent_l1"], out_full["latent_l1"])
    torch.testing.assert_close(out_half["pixel_l1"], l1(x_hat[:2], batch["images"][:2]))


def test_pixel_loss_share_is_counted_in_whole_samples():
    """The model decodes ceil(f x B) samples; the FLOP count uses the same share (0.1 of 4 is 1 sample = 25%)
    and float noise does not add a sample (0.07 x 100 is 7)."""
    from megatron_ov3.models.config import pixel_loss_samples
    from megatron_ov3.models.accounting import step_flops_per_sample

    assert [pixel_loss_samples(f, b) for f, b in ((0.1, 4), (0.07, 100), (0.5, 4), (1.0, 8), (0.01, 3))] == \
        [1, 7, 2, 8, 1]
    vae = FrozenVAE.tiny()
    full = step_flops_per_sample(get_config("tiny", image_size=32), 32, vae, micro_batch=4)
    tenth = step_flops_per_sample(get_config("tiny", image_size=32, pixel_loss_fraction=0.1), 32, vae, micro_batch=4)
    assert tenth["vae_decode"] == pytest.approx(0.25 * full["vae_decode"], rel=1e-12)


def test_vae_flop_count_is_cached_without_keeping_the_vae():
    import gc
    import weakref

    from megatron_ov3.models.accounting import vae_fwd_flops

    vae = FrozenVAE.tiny()
    first = vae_fwd_flops(vae, 32)
    ref = weakref.ref(vae)
    del vae
    gc.collect()
    assert ref() is None  # the cache holds numbers, not the VAE
    assert vae_fwd_flops(FrozenVAE.tiny(seed=5), 32) == first  # same architecture: same count


def test_vae_encode_is_scaled_posterior_mean(mp1):
    vae = FrozenVAE.tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = vae.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(vae.encode(x), (mean - 0.1159) * 0.3611)
    assert not vae.encode(x).requires_grad


def test_vae_save_load_local(tmp_path, mp1):
    vae = FrozenVAE.tiny(seed=3)
    vae.save_pretrained(str(tmp_path / "vae"))
    again = FrozenVAE.from_pretrained(str(tmp_path), subfolder="vae")
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(vae.encode(x), again.encode(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenVAE.from_pretrained(str(tmp_path / "nope"))


def test_sincos_table_is_computed_once_and_never_aliased_by_a_parameter(mp1):
    assert sincos_2d(64, 4, 4) is sincos_2d(64, 4, 4)  # cached per arguments, not recomputed in every forward
    model = build_model(get_config("tiny", image_size=32, position_embedding_type="learned"))
    g = model.cfg.pos_embed_ref_grid
    table = sincos_2d(model.cfg.encoder.width, g, g)
    torch.testing.assert_close(model.encoder.pos_embed.data, table)
    assert model.encoder.pos_embed.data_ptr() != table.data_ptr()  # training cannot write into the cache


def test_sincos_interpolates_between_resolutions():
    full = sincos_2d(64, 16, 16)
    half = sincos_2d(64, 8, 16)
    idx = [(2 * i) * 16 + 2 * j for i in range(8) for j in range(8)]
    torch.testing.assert_close(half, full[idx])


def test_learned_position_table_resizes_like_open_clip(mp1):
    cfg = get_config("tiny", image_size=64, class_token=True, position_embedding_type="learned", pos_embed_ref_grid=8)
    model = build_model(cfg, vae=FrozenVAE.tiny())
    enc = model.encoder
    torch.testing.assert_close(enc.pos_embed.detach(), sincos_2d(cfg.encoder.width, 8, 8))  # initialised as sincos
    assert resize_table(enc.pos_embed, 8) is enc.pos_embed  # the table's own grid: no resampling
    small = resize_table(enc.pos_embed.detach(), 4)  # 64px -> 32px grid
    img = enc.pos_embed.detach().reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(img, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(small, ref.permute(0, 2, 3, 1).reshape(16, -1))
    z = torch.randn(2, 16, 8, 8)  # 64px latents
    x = enc.embed(z)
    x.sum().backward()
    assert enc.pos_embed.grad is not None and enc.class_pos_embed.grad is not None  # both are trained
    assert enc.embed(torch.randn(2, 16, 4, 4)).shape[1] == 1 + 4  # another resolution works


def test_patchify_roundtrip():
    z = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(unpatchify(patchify(z, 2), 2, 16), z)


def test_decoder_noise_train_only_and_split_invariant(mp1):
    x = torch.zeros(4, 16, 8)
    seeds = torch.tensor([11, 12, 13, 14])
    full = per_sample_noise(x, 0.8, seeds)
    part = per_sample_noise(x[2:], 0.8, seeds[2:])
    torch.testing.assert_close(full[2:], part)
    model = tiny_model()
    model.eval()
    tok = torch.randn(2, 16, 64)
    torch.testing.assert_close(model.latent_decoder(tok), model.latent_decoder(tok))


def test_overfit_one_batch_lowers_every_loss(mp1):
    torch.manual_seed(0)
    model = tiny_model(image_size=32)
    batch = random_batch(b=8, image_size=32, pad_from=20)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    model.train()
    first = None
    for step in range(30):
        out = model(batch)
        if first is None:
            first = {k: float(out[k]) for k in LOSS_NAMES if k in out}
        opt.zero_grad()
        out["total_loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = {k: float(v) for k, v in model(batch).items() if k in first}
    for k in first:
        assert last[k] < first[k], (k, first[k], last[k])


def test_vae_decode_backward_costs_one_forward():
    """The FLOP count's decode-with-grad term (2x the decoder's forward) against torch's own counter over a real
    forward + backward to the latents of the frozen VAE (no weight gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ov3.models import FrozenVAE
    from megatron_ov3.models.accounting import vae_fwd_flops

    vae = FrozenVAE.tiny(seed=0)
    z = torch.zeros(2, 16, 4, 4, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        vae.decode(z).float().mean().backward()
    per_image = counter.get_total_flops() / 2
    forward = vae_fwd_flops(vae, 32)[1]
    assert abs(per_image / forward - 2.0) < 0.1, per_image / forward


def test_generators_saved_on_another_kind_of_device_are_left_seeded_not_a_crash(fresh_seed):
    """A checkpoint written on a GPU (megatron's tracker holds 16-byte CUDA Philox states and a 'cuda' entry) read
    on this CPU, and the CPU's own states restored exactly; the GPU-side reverse takes the same branch."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_ov3.checkpointing.deepspeed_io import rng_state, set_rng_state

    mine = rng_state()
    gpu = {"cpu": mine["cpu"], "cuda": torch.zeros(16, dtype=torch.uint8),
           **{k: torch.zeros(16, dtype=torch.uint8) for k in mine if k.startswith("tracker/")}}
    before = get_cuda_rng_tracker().get_states()
    assert set_rng_state(gpu) is False
    assert all(torch.equal(before[k], v) for k, v in get_cuda_rng_tracker().get_states().items())
    torch.rand(3)
    assert set_rng_state(mine) is True and torch.equal(torch.get_rng_state(), mine["cpu"])


def test_decoder_noise_on_layernorm_tokens_does_not_follow_the_encoder_scale(mp1):
    """decoder_noise_norm 'layernorm' (RAE's convention, the default): the decoder and its noise see unit-RMS
    tokens, so tokens 10x larger give the same prediction and the same noised input; 'none' follows the scale.
    A config saved before the option existed reads as 'none' (what it trained with)."""
    from megatron_ov3.models import OV3Config
    from megatron_ov3.models.decoder import decoder_input

    tok = torch.randn(2, 4, 64) * 3 + 1
    for norm, same in (("layernorm", True), ("none", False)):
        model = tiny_model(image_size=32, decoder_noise_norm=norm)
        model.eval()
        a, b = model.latent_decoder(tok), model.latent_decoder(tok * 10)
        assert torch.allclose(a, b, atol=1e-4) == same, norm
    normed = decoder_input(tok, model.cfg.replace(decoder_noise_norm="layernorm"))
    torch.testing.assert_close(normed.pow(2).mean(-1), torch.ones(2, 4), atol=1e-4, rtol=0)
    saved = {k: v for k, v in model.cfg.to_dict().items() if k != "decoder_noise_norm"}
    assert OV3Config.from_saved(saved).decoder_noise_norm == "none"
