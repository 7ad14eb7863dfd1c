"""The plain-torch FID Inception-v3 (megatron_ov3/eval/inception.py) against pytorch-fid's network: the same
parameter names and shapes (so the standard pt_inception weights file loads as it is) and the same pool3
features on the same weights (tests/data/inception_reference.npz, made once by make_inception_reference.py);
loading the weights file safely; rFID of identical sets ~0, growing with a shift."""
import ast
import os
import sys

import numpy as np
import pytest
import torch

from megatron_ov3.eval import metrics as M
from megatron_ov3.eval.inception import FIDInceptionV3, fid_inception, load_state

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
sys.path.insert(0, DATA)
from inception_weights import images, synthetic_weights  # noqa: E402

REF = np.load(os.path.join(DATA, "inception_reference.npz"))


def _shapes():
    return {str(n): tuple(ast.literal_eval(str(s))) for n, s in zip(REF["names"], REF["shapes"])}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inc") / "pt_inception-standin.pth"
    torch.save({k: torch.from_numpy(v) for k, v in synthetic_weights(_shapes()).items()}, path)
    return str(path)


def test_parameter_names_and_shapes_are_pytorch_fids():
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()
            if not k.endswith("num_batches_tracked")}
    assert ours == _shapes()


def test_pool3_features_match_pytorch_fid(weights_file):
    net = fid_inception(weights_file)
    with torch.no_grad():
        feats = net(torch.from_numpy(images())).double().numpy()
    ref = REF["features"]
    assert feats.shape == ref.shape == (4, 2048)
    assert np.abs(ref).mean() > 0.01  # the stand-in weights give non-trivial features
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_weights_file_errors(tmp_path, weights_file):
    state = torch.load(weights_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="is not the FID Inception-v3 weights file .*missing Mixed_7c"):
        fid_inception(str(tmp_path / "short.pth"))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        fid_inception(str(tmp_path / "none.pth"))

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot be read as plain tensors"):
        fid_inception(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "ran").exists()
    net = FIDInceptionV3()
    with pytest.raises(ValueError, match="wrong shape of fc.weight"):
        load_state(net, dict(state, **{"fc.weight": torch.zeros(10, 2048)}), "x")


def test_rfid_is_zero_for_identical_sets_and_grows_with_a_shift(weights_file):
    run = M.inception_feature_extractor(weights_file)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g) * 1.6 - 0.8  # in [-1, 1]
    real = run(x)
    assert abs(M.frechet_distance(real, run(x.clone()))) < 1e-3
    near, far = M.frechet_distance(real, run(x + 0.1)), M.frechet_distance(real, run(x + 0.3))
    assert 0 < near < far
