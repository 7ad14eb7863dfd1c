"""Output folders are never silently mixed: every tool refuses a folder holding files it did not write (one line,
exit 2, the file untouched), reuses only its own earlier output, and pretrain --save accepts only a checkpoint
folder (plus the run's own tensorboard/metrics inside it)."""
import os

import pytest

from conftest import run_outputs
from dist_utils import run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def _foreign(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    return d


COMMANDS = {
    "pretrain": lambda d: ["-m", "megatron_ov3.pretrain", "--mock-data", "--tiny-vae", "--image-size", "32",
                           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--save", d],
    "evaluate": lambda d: ["tools/evaluate.py", "--load", d / "none", "--data-path", "x.tar", "--tokenizer", "t.model",
                           "--output", d],
    "make_shards": lambda d: ["tools/make_shards.py", "--input-dir", ROOT, "--output-dir", d],
    "cache_latents": lambda d: ["tools/cache_latents.py", "--data-path", "x.tar", "--output-dir", d,
                                "--image-size", "32", "--tiny-vae"],
}


@pytest.mark.parametrize("tool", list(COMMANDS))
def test_a_folder_of_other_files_is_refused(tool, tmp_path):
    d = _foreign(tmp_path)
    r = run_inprocess(*COMMANDS[tool](d))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, (r.returncode, r.stderr[-2000:])
    assert "notes.txt" in errors[0] and str(d) in errors[0], errors[0]
    assert sorted(os.listdir(d)) == ["notes.txt"] and (d / "notes.txt").read_text() == "my notes"


def test_pretrain_save_accepts_its_own_checkpoints_and_run_outputs(tmp_path, trained_ckpt):
    """The session's trained checkpoint was saved into a new folder with its tensorboard and metrics inside (the
    first half); resuming into that folder with the same outputs is accepted (the second)."""
    import shutil

    d = shutil.copytree(trained_ckpt, tmp_path / "ck")
    assert {"tensorboard", "metrics.jsonl", "latest"} <= set(os.listdir(d))
    (d / "eval").mkdir()  # what in-training evaluation writes there
    r = run_inprocess(*COMMANDS["pretrain"](d)[:-4], "--train-iters", "3", "--load", d, "--save", d, *run_outputs(d))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]


def test_claim_reuses_only_the_same_tools_folder(tmp_path):
    from megatron_ov3.errors import UsageError
    from megatron_ov3.outputs import claim

    claim(str(tmp_path / "a"), "evaluate", "--output")
    (tmp_path / "a" / "report.json").write_text("{}")
    claim(str(tmp_path / "a"), "evaluate", "--output")  # an earlier evaluate output: reused
    with pytest.raises(UsageError, match="was written by evaluate"):
        claim(str(tmp_path / "a"), "cache_latents", "--output-dir")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        claim(str(tmp_path / "f"), "evaluate", "--output")
