"""LPIPS (VGG variant, Zhang et al. 2018) as a frozen perceptual loss, weights from a local file.

Same module tree and state-dict keys as ``lpips.LPIPS(net='vgg')`` (``scaling_layer.*``, ``net.sliceK.I.*``
with torchvision's VGG16 indices, ``linK.model.1.weight``), so ``torch.save(lpips.LPIPS(net='vgg').state_dict(),
path)`` on any machine with the ``lpips`` package produces a file this loads. Written out here because the
``lpips`` package needs torchvision, which does not install beside the pinned CPU torch; the network is tiny.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from ..errors import MissingFile, UsageError

_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
_CHANNELS = [64, 128, 256, 512, 512]


def _vgg16_features() -> list:
    layers, c = [], 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return layers


class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


class _VGG16Slices(nn.Module):
    def __init__(self):
        super().__init__()
        feats = _vgg16_features()
        for k, (a, b) in enumerate(_SLICES, start=1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), feats[i])
            setattr(self, f"slice{k}", s)

    def forward(self, x):
        outs = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class _NetLin(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG. ``forward(x, y)`` with images in [-1, 1] returns the per-image distance (B,)."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Slices()
        for k, c in enumerate(_CHANNELS):
            setattr(self, f"lin{k}", _NetLin(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval (no dropout)
        return super().train(False)

    @classmethod
    def from_file(cls, path: str) -> "LPIPS":
        """Load a full LPIPS-VGG state dict (``.pth`` via ``weights_only=True``, or ``.safetensors``)."""
        if not os.path.isfile(path):
            raise MissingFile(f"LPIPS weights {path!r} not found; pass a local LPIPS-VGG state-dict file")
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(path)
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a weights file at all (text, a pickle with code, torn bytes)
            raise UsageError(f"--lpips-path {path!r} could not be read as weights ({type(e).__name__}); pass a "
                             f"local LPIPS-VGG state-dict file (.pth or .safetensors)") from None
        if not isinstance(sd, dict):
            raise UsageError(f"--lpips-path {path!r} holds a {type(sd).__name__}, not a state dict")
        model = cls()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UsageError(
                f"{path!r} is not an LPIPS-VGG state dict (missing {len(missing)} keys e.g. {missing[:2]}, "
                f"unexpected {len(unexpected)} e.g. {unexpected[:2]})"
            )
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net(self.scaling_layer(x))
        fy = self.net(self.scaling_layer(y))
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = getattr(self, f"lin{k}").model((a - b) ** 2)
            total = total + d.mean(dim=(2, 3))
        return total.flatten()
