"""Metrics against known answers."""
import math

import numpy as np
import pytest
import torch

from megatron_ov3.eval import metrics as M


def test_psnr_identical_is_capped_and_ssim_is_one():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.all(M.psnr(x, x) == M.PSNR_CAP)
    torch.testing.assert_close(M.ssim(x, x), torch.ones(3))


def test_psnr_known_noise_level():
    x = torch.zeros(2, 3, 64, 64)
    y = x.clone()
    y[..., ::2] += 0.1  # MSE = 0.1^2 / 2 exactly
    expected = 10 * math.log10(4 / (0.01 / 2))
    torch.testing.assert_close(M.psnr(y, x), torch.full((2,), expected), atol=1e-4, rtol=0)


def test_ssim_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    a = M.ssim(x + 0.05 * torch.randn(x.shape, generator=g), x)
    b = M.ssim(x + 0.5 * torch.randn(x.shape, generator=g), x)
    assert torch.all(a < 1) and torch.all(b < a)


def test_recall_identical_embeddings_is_one():
    e = torch.randn(20, 8)
    r = M.recall_at_k(e, e.clone())
    assert all(v == 1.0 for v in r.values())
    shuffled = M.recall_at_k(e, e[torch.arange(19, -1, -1)])
    assert shuffled["i2t_R@1"] < 0.2


def test_recall_degenerate_embeddings_score_chance_or_nan():
    n = 20
    collapsed = M.recall_at_k(torch.ones(n, 8), torch.randn(n, 8))  # every image embedding identical
    assert collapsed["t2i_R@1"] == 0.0 and collapsed["i2t_R@10"] == pytest.approx(0.5)
    assert all(v == 0.0 for k, v in M.recall_at_k(torch.randn(n, 8), torch.zeros(n, 8)).items() if "R@1" in k)
    diverged = M.recall_at_k(torch.full((n, 8), float("nan")), torch.randn(n, 8))
    assert all(math.isnan(v) for v in diverged.values())


def test_zero_shot_ignores_unlabelled_images():
    cls = torch.eye(4)
    img = torch.eye(4)[[0, 1, 2, 3]] + 0.01
    assert M.zero_shot_topk(img, cls, torch.tensor([0, -1, 2, -1]), ks=(1,))["top1"] == 1.0
    with pytest.raises(ValueError, match="no image has a class label"):
        M.zero_shot_topk(img, cls, torch.full((4,), -1), ks=(1,))


def test_zero_shot_topk():
    cls = torch.eye(4)
    img = torch.eye(4)[[0, 1, 2, 3, 0]] + 0.01
    labels = torch.tensor([0, 1, 2, 3, 1])
    r = M.zero_shot_topk(img, cls, labels, ks=(1, 5))
    assert abs(r["top1"] - 0.8) < 1e-6 and r["top5"] == 1.0


def test_frechet_distance_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    assert abs(M.frechet_distance(a, a)) < 1e-6
    b = rng.normal(size=(20000, 3)) * 2 + 1  # mean shift 1 per dim, std 2: FID = 3*1 + 3*(1 + 4 - 2*2) = 6
    assert abs(M.frechet_distance(a, b) - 6.0) < 0.15


def test_frechet_distance_against_scipy_symmetric_form():
    """Against the symmetric form Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) with scipy's sqrtm: another route
    to the same trace (the implementation uses sqrtm(S_a S_b))."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = linalg.sqrtm(sa).real
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(ra @ sb @ ra).real)
    assert M.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)


def test_image_grid_rows_are_kinds_and_the_png_is_labelled_and_large(tmp_path):
    g = M.image_grid(torch.zeros(3, 3, 8, 8), [torch.ones(3, 3, 8, 8), -torch.ones(3, 3, 8, 8)])
    assert g.shape == (3, 24, 24) and g.dtype == torch.uint8  # rows: input | VAE alone | OV3; images across
    assert g[0, 0, 23] == 128 and g[0, 8, 0] == 255 and g[0, 23, 0] == 0
    from PIL import Image

    from megatron_ov3.eval.evaluate import save_grid

    save_grid(g, str(tmp_path / "grid.png"))
    img = Image.open(tmp_path / "grid.png").convert("RGB")
    w, h = img.size
    assert h == 3 * 160 and w > 3 * 160  # tiles upscaled 20x (nearest), a label column at the left
    margin = w - 3 * 160
    assert img.getpixel((margin + 5, 5)) == (128, 128, 128) and img.getpixel((margin, 170)) == (255, 255, 255)
    label = [img.getpixel((x, y)) for x in range(margin) for y in range(0, 160)]
    assert (0, 0, 0) in label  # the row's name is drawn


def test_frechet_distance_with_fewer_samples_than_features_equals_the_sqrtm_form():
    from scipy import linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 40)), rng.normal(size=(15, 40)) * 1.3 + 0.2
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert M.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
