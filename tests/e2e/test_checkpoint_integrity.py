"""Verifiable checkpoints: every save carries a manifest (size + CRC-32 of every file, fsync'ed before the atomic
publish); --load checks it and names a damaged file (exit 2, nothing on disk changed); tools/checkpoint.py lists,
verifies and makes the universal copy; a save writes no universal copy unless asked, and readers make it on demand."""
import json
import os

import pytest

from conftest import TINY_TRAIN as TRAIN, run_outputs
from dist_utils import one_error, run_inprocess, run_python


def _snapshot(folder):
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(folder) for f in fs}


@pytest.fixture(scope="module")
def saved(trained_ckpt):
    return trained_ckpt


def test_manifest_lists_every_file_and_no_universal_copy_is_written(saved):
    it = saved / "iter_0000002"
    manifest = json.load(open(it / "manifest.json"))["files"]
    on_disk = sorted(os.path.relpath(os.path.join(r, f), it) for r, _, fs in os.walk(it) for f in fs)
    assert sorted(manifest) == [n for n in on_disk if n != "manifest.json"]
    assert all(manifest[n]["size"] == os.path.getsize(it / n) for n in manifest)
    assert "universal_index.json" in manifest and not (it / "universal").exists()
    r = run_python("tools/checkpoint.py", "verify", saved)  # the tool's one subprocess: its wiring
    assert r.returncode == 0 and "intact" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_load_names_the_damaged_file_and_changes_nothing(saved, tmp_path, damage):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    it = ck / "iter_0000002"
    victim = it / ("manifest.json" if damage == "manifest" else "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))
    before = _snapshot(ck)
    err = one_error(run_inprocess(*TRAIN, "--train-iters", 4, "--load", ck, "--save", ck, *run_outputs(ck)))
    assert victim.name in err and ("damaged" in err or "truncated" in err), err
    assert _snapshot(ck) == before
    if damage != "manifest":
        r = run_inprocess("tools/checkpoint.py", "verify", ck)
        assert r.returncode == 2 and victim.name in r.stdout and "DAMAGED" in r.stdout, r.stdout + r.stderr


def test_readers_make_the_universal_copy_on_demand(saved, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    r = run_inprocess("tools/convert_to_hf.py", "--load", ck, "--target", "hf", "--output", tmp_path / "hf",
                      "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote the universal copy" in r.stdout and (ck / "iter_0000002" / "universal" / "manifest.json").exists()
    r = run_inprocess("tools/checkpoint.py", "list", ck)
    assert r.returncode == 0 and "iter_0000002" in r.stdout and "universal copy" in r.stdout
    assert "TP1 x PP1 x DP1 ZeRO-1" in r.stdout, r.stdout
    out = tmp_path / "elsewhere"
    r = run_inprocess("tools/checkpoint.py", "to-universal", saved, "--output", out)
    assert r.returncode == 0 and (out / "stage0.safetensors").exists(), r.stderr[-2000:]
    assert not (saved / "iter_0000002" / "universal").exists()
    err = one_error(run_inprocess("tools/checkpoint.py", "verify", ck, "--iteration", 7))
    assert "no iter_0000007" in err and "iter_0000002" in err
