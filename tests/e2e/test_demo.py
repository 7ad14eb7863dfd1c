"""A short version of `make demo` (fewer samples, training and fitting steps): the whole path runs offline -- data,
tokenizer, the fitted VAE loaded through --vae-path, training through the DeepSpeed launcher, evaluation -- and
the report prints the VAE next to OV3, chance levels, and writes grid.png and curves.png."""
import os
import subprocess

import pytest

from dist_utils import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # runs the whole demo script


def test_short_demo_reports_what_the_full_one_does(tmp_path):
    """About 150 s: the only test of `make demo`'s own script, end to end (data and tokenizer tools, the VAE fit,
    the launcher, two evaluations, the report): each piece is tested alone elsewhere, their wiring only here."""
    env = subprocess_env(ROOT, DEMO_DIR=str(tmp_path / "demo"), NUM_SAMPLES="400", TRAIN_ITERS="20",
                         VAE_STEPS="60")
    env["PATH"] = os.path.dirname(__import__("sys").executable) + os.pathsep + env["PATH"]  # the venv's tools
    r = subprocess.run(["bash", "examples/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = r.stdout
    for words in ("losses, iteration 10 -> 20", "frozen VAE alone", "OV3 trained", "(chance 0.025)",
                  "zero-shot top1 (24 cl.)", "(chance 0.042)", "rows: input | VAE alone | OV3", "curves.png",
                  "a stand-in for FLUX.1"):
        assert words in out, (words, out[-3000:])
    assert "ETA" in out and "iteration     20/20" in out
    d = tmp_path / "demo"
    assert (d / "eval-trained" / "grid.png").stat().st_size > 1000 and (d / "curves.png").stat().st_size > 1000
    assert (d / "summary.txt").read_text().strip() in out
    from PIL import Image

    w, h = Image.open(d / "eval-trained" / "grid.png").size
    assert h == 3 * 192 and w > 8 * 192  # rows input | VAE alone | OV3 of 8 images, 64px drawn at 192px, labels
