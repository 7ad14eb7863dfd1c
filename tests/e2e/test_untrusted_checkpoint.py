"""Loading never runs code from a file: a checkpoint whose DeepSpeed model states hold a planted pickle is
refused with one line (exit 2) by every entry point that reads checkpoints, and its payload never runs."""
import os

import pytest
import torch

from conftest import TINY_TRAIN
from dist_utils import one_error, run_inprocess


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what an attacker's pickle does: call os.system when unpickled
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def planted(tmp_path):
    ck, marker = tmp_path / "ck", tmp_path / "PAYLOAD_RAN"
    (ck / "iter_0000001").mkdir(parents=True)
    (ck / "latest").write_text("iter_0000001")
    torch.save({"module": {}, "evil": _Payload(marker)}, ck / "iter_0000001" / "mp_rank_00_model_states.pt")
    return ck, marker


TRAIN = TINY_TRAIN + ["--train-iters", "2"]


@pytest.mark.parametrize("flag", ["--load", "--finetune-from"])
def test_training_refuses_a_planted_pickle(planted, flag):
    ck, marker = planted
    err = one_error(run_inprocess(*TRAIN, flag, ck))
    assert "refusing to load" in err and "mp_rank_00_model_states.pt" in err and "system" in err, err
    assert not marker.exists(), "the planted payload ran"


def test_export_and_evaluation_read_no_pickle(planted, tmp_path):
    ck, marker = planted
    err = one_error(run_inprocess("tools/convert_to_hf.py", "--load", ck, "--target", "hf", "--output", tmp_path / "x"))
    assert "neither a universal copy nor universal_index.json" in err
    err = one_error(run_inprocess("tools/evaluate.py", "--load", ck, "--data-path", "d/{0..1}.tar", "--tokenizer",
                               "t.model", "--output", tmp_path / "e"))
    assert "neither a universal copy nor universal_index.json" in err
    assert not marker.exists()


def test_a_damaged_model_states_file_is_named(tmp_path, trained_ckpt):
    """A real checkpoint, its model-states file truncated: one line naming the file, not a traceback."""
    import shutil

    ck = shutil.copytree(trained_ckpt, tmp_path / "ck")
    f = ck / "iter_0000002" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = one_error(run_inprocess(*TRAIN[:-1], "4", "--load", ck))
    assert "is damaged" in err and "mp_rank_00_model_states.pt" in err, err
