"""Deterministic stand-in weights for the FID Inception-v3 (the real file cannot be downloaded here): every tensor
from NumPy, seeded by its name, so pytorch-fid's network (in another environment) and ours get the same values.
He-scaled convolutions and near-identity BatchNorm keep activations O(1) through the 94 layers."""
import zlib

import numpy as np

INPUT_SEED, N_IMAGES, SIZE = 7, 4, 64


def synthetic_weights(shapes):
    """{name: shape} -> {name: float32 array}."""
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name.endswith("running_var") or name.endswith("bn.weight"):
            v = rng.uniform(0.8, 1.2, shape)
        elif name.startswith("fc."):
            v = rng.normal(0.0, 0.01, shape)
        else:  # bn.bias, running_mean
            v = rng.uniform(-0.1, 0.1, shape)
        out[name] = v.astype(np.float32)
    return out


def images():
    """(N, 3, SIZE, SIZE) float32 in [0, 1] (not 299: the network's own resize is part of what is compared)."""
    return np.random.default_rng(INPUT_SEED).uniform(0, 1, (N_IMAGES, 3, SIZE, SIZE)).astype(np.float32)
