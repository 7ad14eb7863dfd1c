import pytest
import torch

from megatron_ov3.models.lpips import LPIPS


def test_lpips_local_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = LPIPS()
    for p in net.parameters():  # positive linear heads, as in trained LPIPS
        if p.dim() == 4 and p.shape[-1] == 1:
            p.data.abs_()
    path = tmp_path / "lpips_vgg.pth"
    torch.save(net.state_dict(), path)
    loaded = LPIPS.from_file(str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x, y), net(x, y))
    assert torch.all(loaded(x, x) == 0)
    assert torch.all(loaded(x, y) > 0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert "net.slice2.5.weight" in net.state_dict() and "lin4.model.1.weight" in net.state_dict()


def test_lpips_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LPIPS.from_file(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an LPIPS-VGG state dict"):
        LPIPS.from_file(str(bad))


def test_model_with_lpips_loss(tmp_path, mp1):
    from helpers import random_batch, tiny_model

    path = tmp_path / "lpips.pth"
    torch.save(LPIPS().state_dict(), path)
    model = tiny_model(image_size=32, lpips_weight=0.5, lpips_path=str(path))
    out = model(random_batch(b=2, image_size=32))
    assert "lpips" in out and torch.isfinite(out["lpips"])
    out["total_loss"].backward()
    assert not any(p.grad is not None for p in model.lpips.parameters())
