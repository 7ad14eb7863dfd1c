import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mp1():
    """Single-process megatron parallel state (TP1 x PP1), shared by unit tests."""
    from megatron_ov3 import parallel

    parallel.initialize_model_parallel(1, 1, seed=0)
    yield


@pytest.fixture()
def fresh_seed(mp1):
    from megatron_ov3 import parallel

    parallel.initialize_model_parallel(1, 1, seed=0)
    yield


def pytest_collection_modifyitems(config, items):
    from megatron_ov3.models.specs import te_available

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (run on the device machine)")
    skip_te = pytest.mark.skip(reason="needs Transformer Engine, which does not import here")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "te" in item.keywords and not te_available():
            item.add_marker(skip_te)
