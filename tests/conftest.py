import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
torch.set_num_threads(2)


@pytest.fixture()
def mp1():
    """Single-process megatron parallel state (TP1 x PP1), shared by unit tests: made once, and made again only
    when something tore it down (an in-process command that ended its own process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ov3 import parallel

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        parallel.initialize_model_parallel(1, 1, seed=0)
    yield


@pytest.fixture()
def fresh_seed(mp1):
    from megatron_ov3 import parallel

    parallel.initialize_model_parallel(1, 1, seed=0)
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """320 synthetic 32px samples in 8 real tar shards and a 64-token sentencepiece model, made once per session:
    (data path in brace notation, tokenizer path). Tests only read it."""
    from helpers import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def launcher_run(tiny_data, tmp_path_factory):
    """The tiny recipe on ``tiny_data`` through ``deepspeed --num_gpus 2``, 6 straight iterations saving every 2:
    (metrics, stdout, checkpoint folder); the reference of the exact-resume and multi-node runs."""
    from launcher_runs import straight_run

    return straight_run(tiny_data, tmp_path_factory.mktemp("straight"))


# the one tiny training run whose checkpoint the checkpoint, output-folder and bad-input tests read (or damage,
# after copying it); it also writes the run's own tensorboard and metrics inside its --save folder
TINY_TRAIN = ["-m", "megatron_ov3.pretrain", "--mock-data", "--tiny-vae", "--image-size", "32", "--micro-batch-size",
              "2", "--global-batch-size", "2", "--log-interval", "1"]


def run_outputs(ck):
    """The flags that put a run's own tensorboard and metrics inside its --save folder ``ck`` (as the fixture's)."""
    return ["--tensorboard-dir", ck / "tensorboard", "--metrics-file", ck / "metrics.jsonl"]


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory):
    """A tiny OV3 trained 2 iterations on --mock-data (ZeRO-1, fp32) and saved once per session: the ``--save``
    folder (``iter_0000002``, ``latest``, ``tensorboard/``, ``metrics.jsonl``). Read-only: copy it
    (``shutil.copytree``) to damage or extend it."""
    from dist_utils import run_python

    ck = tmp_path_factory.mktemp("trained") / "ck"
    r = run_python(*TINY_TRAIN, "--train-iters", 2, "--save", ck, *run_outputs(ck))
    assert r.returncode == 0, r.stderr[-3000:]
    return ck


@pytest.fixture(scope="session")
def universal_init(tmp_path_factory):
    """``tools/init_checkpoint.py --image-size 32``: the universal init checkpoint every parallel layout starts from
    (and the input of the export's bad-input tests); the ``universal`` folder."""
    from dist_utils import run_python

    d = tmp_path_factory.mktemp("init")
    r = run_python("tools/init_checkpoint.py", "--image-size", 32, "--output", d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "universal"


@pytest.fixture(scope="session")
def layout_runs(universal_init, tmp_path_factory):
    """Every parallel layout's tiny training run (tests/layouts.py): {name: (metrics, stdout)}, each saving layout's
    checkpoints in ``layout_runs.folder / name``."""
    from layouts import run_all

    d = tmp_path_factory.mktemp("layouts")
    runs = run_all(d, str(universal_init))
    return type("LayoutRuns", (dict,), {"folder": d})(runs)


def pytest_collection_modifyitems(config, items):
    from megatron_ov3.models.specs import te_available

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (run on the device machine)")
    skip_te = pytest.mark.skip(reason="needs Transformer Engine, which does not import here")
    for item in items:
        if "distributed" in item.keywords:  # several processes: never in `make test-fast`
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "te" in item.keywords and not te_available():
            item.add_marker(skip_te)
