"""Run once, in an environment where pytorch-fid imports (it needs torchvision, which cannot be installed beside
this project's pinned CPU torch): pytorch-fid's FID Inception-v3 with the stand-in weights of inception_weights.py
-> inception_reference.npz (its parameter names and shapes, and the pool3 features of the stand-in images).

    python -m venv /tmp/fidref && /tmp/fidref/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/fidref/bin/pip install --no-deps pytorch-fid==0.3.0 && /tmp/fidref/bin/pip install scipy pillow
    /tmp/fidref/bin/python tests/data/make_inception_reference.py
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inception_weights import images, synthetic_weights  # noqa: E402


def pytorch_fid_network():
    """pytorch_fid.inception.fid_inception_v3's network, without its download of the weights."""
    import torchvision
    from pytorch_fid import inception as pi

    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = pi.FIDInceptionA(192, 32), pi.FIDInceptionA(256, 64), \
        pi.FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = pi.FIDInceptionC(768, 128), pi.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = pi.FIDInceptionC(768, 160), pi.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = pi.FIDInceptionE_1(1280), pi.FIDInceptionE_2(2048)
    return net


def main():
    from unittest import mock

    from pytorch_fid import inception as pi

    net = pytorch_fid_network()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    net.load_state_dict({k: torch.from_numpy(v) for k, v in synthetic_weights(shapes).items()}, strict=False)
    # pytorch-fid's own wrapper (resize to 299, scale to [-1, 1], its block split) around that network
    with mock.patch.object(pi, "fid_inception_v3", return_value=net):
        model = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    with torch.no_grad():
        feats = model(torch.from_numpy(images()))[0].flatten(1).double().numpy()
    names = np.array([k for k in shapes if not k.endswith("num_batches_tracked")])
    np.savez_compressed(os.path.join(os.path.dirname(os.path.abspath(__file__)), "inception_reference.npz"),
                        names=names, shapes=np.array([str(shapes[k]) for k in names]), features=feats,
                        versions=np.array([f"pytorch-fid {__import__('pytorch_fid').__version__}",
                                           f"torch {torch.__version__}"]))
    print(feats.shape, float(np.abs(feats).mean()))


if __name__ == "__main__":
    main()
