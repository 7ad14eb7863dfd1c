"""Training augmentation (inception crop + SimCLR jitter/grayscale): the parameters' ranges, seeded views that
survive resume and data-parallel splitting, a new view per epoch, centre crops for evaluation, latent caching."""
import io
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_ov3.data import DataConfig, DataIterator
from megatron_ov3.data.images import (Augment, apply_jitter, apply_jitter_pil, color_jitter, crop_resize, decode_image,
                                      inception_box, jitter_ops, planar, shift_hue)
from megatron_ov3.data.synthetic import write_synthetic_shards
from megatron_ov3.data.tokenizer import train_tokenizer


def _jpeg(w=96, h=64, seed=0, quality=95):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :, None] * np.array([220, 120, 30]) + \
        np.linspace(0, 1, h)[:, None, None] * np.array([20, 110, 210])
    x = np.clip(x + rng.normal(0, 8, x.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("aug")
    write_synthetic_shards(str(d), 48, samples_per_shard=12, image_size=48, seed=3)  # 4 shards
    tok = train_tokenizer(["a red circle on white", "a blue square"] * 20, str(d / "tok"), vocab_size=40)
    return str(d / "synthetic-{00000..00003}.tar"), tok


def _cfg(spec, tok, **kw):
    base = dict(data_path=spec, tokenizer=tok, micro_batch_size=4, image_size=32, num_workers=0, shuffle_buffer=8,
                seed=5)
    base.update(kw)
    return DataConfig(**base)


def _views(spec, tok, ranks=1, **kw):
    """{sample id (its noise seed): image} over every rank of one epoch."""
    out = {}
    for r in range(ranks):
        for b in DataIterator(_cfg(spec, tok, epochs=1, drop_last=False, **kw), r, ranks):
            out.update({int(s): img for s, img in zip(b["noise_seeds"], b["images"])})
    return out


def test_inception_box_covers_40_to_100_percent_with_bounded_ratio():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, w, h = inception_box(400, 300, 0.4, rng)
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        areas.append(w * h / 120000)
        ratios.append(w / h)
    assert min(areas) >= 0.4 - 0.01 and max(areas) <= 1.0
    assert min(ratios) >= 3 / 4 - 0.01 and max(ratios) <= 4 / 3 + 0.01
    areas = np.array(areas)  # uniform in [0.4, 1], less the draws whose box does not fit (rejected, drawn again)
    assert (areas < 0.5).mean() > 0.15 and (areas > 0.9).mean() > 0.01
    # a strip (ratio 10) cannot hold a 3/4..4/3 crop of >= 40 %: the central crop of the clamped ratio
    assert inception_box(1000, 100, 0.4, random.Random(1)) == (433, 0, 133, 100)


def test_crop_resize_is_bilinear_antialiased_and_jpeg_draft_keeps_pixels():
    data = _jpeg(512, 512)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    want = np.asarray(full.resize((64, 64), Image.BILINEAR), dtype=np.float64)
    drafted = np.asarray(crop_resize(Image.open(io.BytesIO(data)), (0, 0, 512, 512), 64), dtype=np.float64)
    assert np.abs(drafted - want).mean() < 2.0  # 1/4-scale DCT decode, then the same antialiased resize
    aliased = np.asarray(full.resize((64, 64), Image.NEAREST), dtype=np.float64)
    assert np.abs(aliased - want).mean() > np.abs(drafted - want).mean()
    png = io.BytesIO()
    full.save(png, "PNG")
    exact = np.asarray(crop_resize(Image.open(io.BytesIO(png.getvalue())), (0, 0, 512, 512), 64), dtype=np.float64)
    assert np.array_equal(exact, want)  # no draft for other formats


def test_color_jitter_and_grayscale():
    x = planar(Image.new("RGB", (8, 8), (200, 40, 40)))
    grey = color_jitter(x, Augment(jitter=0.0, grayscale_prob=1.0), random.Random(0))
    assert np.allclose(grey[0], grey[1]) and np.allclose(grey[1], grey[2])
    assert np.allclose(grey[0], 0.299 * 200 + 0.587 * 40 + 0.114 * 40)
    assert np.array_equal(color_jitter(x, Augment(jitter=0.0, grayscale_prob=0.0), random.Random(0)), x)
    changed = [not np.array_equal(color_jitter(x, Augment(grayscale_prob=0.0), random.Random(i)), x)
               for i in range(200)]
    assert 0.7 < np.mean(changed) < 0.9  # applied with probability 0.8
    ops = jitter_ops(Augment(jitter=0.4, jitter_prob=1.0), random.Random(0))
    assert sorted(o for o, _ in ops) == ["brightness", "contrast", "hue", "saturation"]
    for name, f in ops:
        assert abs(f) <= 0.08 if name == "hue" else 0.68 <= f <= 1.32  # SimCLR: 0.8s and 0.2s, s = 0.4
    red = shift_hue(planar(Image.new("RGB", (2, 2), (255, 0, 0))), 1 / 3)  # a third of the circle: red -> green
    assert np.allclose(red[:, 0, 0], [0, 255, 0], atol=1e-3)


def test_float_jitter_matches_torchvision_pil_operations():
    """Ours runs in float; torchvision's PIL path rounds to 8 bits after each operation (and quantises HSV): the
    same operations, within rounding."""
    im = Image.open(io.BytesIO(_jpeg(128, 96))).convert("RGB")
    for name, f in (("brightness", 1.3), ("contrast", 0.7), ("saturation", 1.3), ("hue", 0.08)):
        d = np.abs(apply_jitter(planar(im), [(name, f)]) - planar(apply_jitter_pil(im, [(name, f)])))
        assert d.mean() < (1.0 if name == "hue" else 0.6) and (name == "hue" or d.max() <= 1.05), name
    for i in range(50):
        ops = jitter_ops(Augment(jitter_prob=1.0), random.Random(i))
        assert np.abs(apply_jitter(planar(im), ops) - planar(apply_jitter_pil(im, ops))).mean() < 2.5


def test_views_are_seeded_per_sample_and_differ_across_epochs(shards):
    spec, tok = shards
    data = _jpeg()
    a = decode_image(data, 32, Augment(), random.Random(3))
    assert torch.equal(a, decode_image(data, 32, Augment(), random.Random(3)))
    assert not torch.equal(a, decode_image(data, 32, Augment(), random.Random(4)))
    # one shard per epoch order is fixed: the same sample twice, two epochs, two views
    by_key = defaultdict(list)
    cfg = _cfg(spec.replace("{00000..00003}", "00000"), tok, epochs=2, shuffle_buffer=0, drop_last=False)
    for b in DataIterator(cfg, 0, 1):
        for cap, img in zip(b["caption_ids"], b["images"]):
            by_key[tuple(cap.tolist())].append(img)
    pairs = [v for v in by_key.values() if len(v) == 2]
    assert pairs and all(not torch.equal(x, y) for x, y in pairs)


def test_views_do_not_depend_on_the_data_parallel_split(shards):
    spec, tok = shards
    one, two = _views(spec, tok, 1), _views(spec, tok, 2)
    assert len(one) == 48 and one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_resume_mid_epoch_gives_the_same_views(shards):
    spec, tok = shards
    ref = DataIterator(_cfg(spec, tok, num_workers=2), 0, 1)
    stream = [next(ref)["images"] for _ in range(7)]
    first = DataIterator(_cfg(spec, tok, num_workers=2), 0, 1)
    for _ in range(3):
        next(first)
    resumed = DataIterator(_cfg(spec, tok, num_workers=2), 0, 1, state=first.state_dict())
    assert all(torch.equal(next(resumed)["images"], want) for want in stream[3:])


def test_evaluation_and_no_augment_use_the_centre_crop(shards):
    spec, tok = shards
    from megatron_ov3.data.shards import expand_urls, image_bytes, iter_tar_samples, shard_name
    from megatron_ov3.data.pipeline import noise_seed

    centre = {noise_seed(5, shard_name(u), s["__key__"], 0): decode_image(image_bytes(s), 32)
              for u in expand_urls(spec)[0] for s in iter_tar_samples(u, print)}
    trained = _cfg(spec, tok)
    assert trained.augment and trained.augmentation() == Augment(0.4, 0.4, 0.8, 0.2)  # OpenVision's defaults
    for views in (_views(spec, tok, augment=False), _views(spec, tok, **_eval_overrides(trained))):
        assert views.keys() == centre.keys() and all(torch.equal(views[k], centre[k]) for k in views)
    augmented = _views(spec, tok)
    assert sum(not torch.equal(augmented[k], centre[k]) for k in centre) > 40


def _eval_overrides(cfg):
    ev = cfg.for_evaluation(cfg.data_path)
    assert not ev.augment and ev.epochs == 1 and not ev.drop_last and ev.contrastive_texts == "alt"
    return {"augment": ev.augment}


def test_bad_augmentation_flags_are_usage_errors():
    for kw, flag in ((dict(crop_min_area=0), "--crop-min-area"), (dict(color_jitter=1.5), "--color-jitter"),
                     (dict(grayscale_prob=-0.1), "--grayscale-prob"),
                     (dict(contrastive_texts="recap"), "--contrastive-texts")):
        with pytest.raises(ValueError, match=flag):
            DataConfig(**kw)


def test_latent_cache_of_augmented_views(tmp_path, shards, mp1):
    """A latent cannot be augmented after encoding: a centre-crop cache trains only with --no-augment, a cache of
    views only with augmentation on (same parameters); training draws one cached view per sample and epoch."""
    spec, tok = shards
    from megatron_ov3.data.latent_cache import cache_latents, check_latent_normalisation
    from megatron_ov3.models import FrozenVAE

    vae = FrozenVAE.tiny()
    stats = cache_latents(spec, str(tmp_path / "v"), vae, 32, batch_size=8, progress=False, views=3, aug=Augment())
    assert stats["samples"] == 48
    lat_spec = str(tmp_path / "v" / "synthetic-{00000..00003}.tar")
    check_latent_normalisation(lat_spec, vae, 32, Augment())
    with pytest.raises(ValueError, match="drop --no-augment"):
        check_latent_normalisation(lat_spec, vae, 32, None)
    with pytest.raises(ValueError, match="--crop-min-area/--color-jitter"):
        check_latent_normalisation(lat_spec, vae, 32, Augment(min_area=0.5))
    cache_latents(spec, str(tmp_path / "c"), vae, 32, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="train with --no-augment"):
        check_latent_normalisation(str(tmp_path / "c" / "synthetic-{00000..00003}.tar"), vae, 32, Augment())
    # the cached views are the augmented images' latents, and training draws among them per epoch
    from megatron_ov3.data.pipeline import seeded_rng
    from megatron_ov3.data.shards import decode_latent, image_bytes, iter_tar_samples

    src = next(iter_tar_samples(spec.replace("{00000..00003}", "00000"), print))
    cached = next(iter_tar_samples(lat_spec.replace("{00000..00003}", "00000"), print))
    lat = decode_latent(cached["latent.npy"])
    assert lat.shape == (3, 16, 4, 4)
    view1 = decode_image(image_bytes(src), 32, Augment(), seeded_rng(1234, "cache-view", "synthetic-00000.tar",
                                                                        src["__key__"], 1))
    with torch.no_grad():
        assert np.allclose(vae.encode(view1[None])[0].numpy(), lat[1].astype(np.float32), atol=2e-3)
    index = {}
    for u in [lat_spec.replace("{00000..00003}", f"{i:05d}") for i in range(4)]:
        for smp in iter_tar_samples(u, print):
            for v, z in enumerate(decode_latent(smp["latent.npy"]).astype(np.float32)):
                index[z.tobytes()] = (u, smp["__key__"], v)
    drawn = defaultdict(list)
    for b in DataIterator(_cfg(lat_spec, tok, epochs=4, drop_last=False, shuffle_buffer=0), 0, 1):
        for z in b["latents"]:
            u, key, v = index[z.numpy().tobytes()]
            drawn[(u, key)].append(v)
    assert len(drawn) == 48 and all(len(v) == 4 for v in drawn.values())
    assert {v for vs in drawn.values() for v in vs} == {0, 1, 2}
    assert sum(len(set(vs)) > 1 for vs in drawn.values()) > 30  # another view in another epoch
