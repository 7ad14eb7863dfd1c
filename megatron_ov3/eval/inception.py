"""The FID Inception-v3 in plain torch: 2048-d pool3 features for rFID, from the standard weights file.

The network is the one pytorch-fid and torch-fidelity load ``pt_inception-2015-12-05-6726825d.pth`` into (the
TensorFlow FID graph ported to torchvision's Inception3 layout: 1008 classes, average pools that do not count
padding, a max pool in the last block's pool branch). torchvision does not import beside the CPU torch build this
project pins, so the layers are written here with torchvision's module names, and that file's keys load as they
are. Preprocessing is pytorch-fid's: images in [0, 1] resized to 299x299 (bilinear, ``align_corners=False``) and
scaled to [-1, 1]; torch-fidelity resizes with its own TF1-style bilinear kernel, whose features differ slightly.
``tests/unit/test_inception.py`` compares this module with pytorch-fid's on the same weights (reference features
computed once with pytorch-fid 0.3 and torchvision 0.29, ``tests/data/make_inception_reference.py``).
"""
from __future__ import annotations

import os
from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingFile, UsageError

Size = Union[int, Tuple[int, int]]


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: Size, stride: int = 1, padding: Size = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        d = x
        for i in range(1, 5):
            d = getattr(self, f"branch7x7x3_{i}")(d)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the FID graph's last block (Mixed_7c) pools its pool branch by max, Mixed_7b by average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; not used for pool3 features

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """Load the weights file's tensors (BatchNorm's ``num_batches_tracked`` may be absent, as in the 2015 file);
    every other tensor must be there with its shape."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise UsageError(f"{where} is not the FID Inception-v3 weights file (pt_inception-2015-12-05): "
                         f"{'missing ' + missing[0] if missing else 'wrong shape of ' + bad[0]}"
                         f"{f' and {len(missing) + len(bad) - 1} more' if len(missing) + len(bad) > 1 else ''}")
    model.load_state_dict({k: state[k] for k in own}, strict=False)


def fid_inception(weights_path: str) -> FIDInceptionV3:
    """The network with the standard weights, in eval mode (``torch.load(weights_only=True)``: tensors only)."""
    if not os.path.isfile(weights_path):
        raise MissingFile(f"--inception-weights {weights_path!r} not found (pt_inception-2015-12-05-6726825d.pth, "
                          f"the file pytorch-fid and torch-fidelity download)")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or carrying code
        raise UsageError(f"--inception-weights {weights_path!r} cannot be read as plain tensors ({e})") from None
    model = FIDInceptionV3()
    load_state(model, state, f"--inception-weights {weights_path!r}")
    return model.eval()
