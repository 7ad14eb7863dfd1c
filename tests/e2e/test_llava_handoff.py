"""The LLaVA-1.5 hand-off on CPU with LLaVA's own code (PyPI's llava-torch, installed without its pinned
dependencies by `make install`): tools/llava_patch.py registers the tower in a copy of the llava package (twice:
idempotent), then LLaVA's initialize_vision_modules builds it through LLaVA's builder from an export folder, and a
tiny random Llama runs one forward/backward with two images (stage-1 style: only the projector gets gradients)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from dist_utils import run_inprocess, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # LLaVA's code runs in its own process
llava = pytest.importorskip("llava", reason="llava-torch is installed by `make install` (pip install --no-deps)")


def _run(*cmd, env=None):
    """Our tools in-process; LLaVA's own code (another PYTHONPATH) in a child process."""
    if env is None and str(cmd[0]).startswith("tools/"):
        r = run_inprocess(*cmd)
    else:
        r = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env or subprocess_env(ROOT),
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_export")
    _run("tools/init_checkpoint.py", "--image-size", 64, "--class-token", "--tiny-vae", "--output", d / "init")
    _run("tools/convert_to_hf.py", "--load", d / "init" / "universal", "--target", "llava", "--output", d / "hf",
         "--no-progress")
    return d / "hf"


def test_patch_then_llava_trains_with_the_ov3_tower(export, tmp_path):
    src = tmp_path / "llava_src"
    shutil.copytree(os.path.dirname(llava.__file__), src / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    out = _run("tools/llava_patch.py", "--llava", src)
    assert "added the OV3 branch" in out and "copied llava_ov3_tower.py" in out
    assert "already patched" in _run("tools/llava_patch.py", "--llava", src)
    builder = (src / "llava" / "model" / "multimodal_encoder" / "builder.py").read_text()
    assert builder.index("is_ov3_tower(vision_tower)") < builder.index("CLIPVisionTower(vision_tower")
    env = subprocess_env(ROOT, PYTHONPATH=f"{src}{os.pathsep}{ROOT}")
    res = json.loads(_run(os.path.join("tests", "e2e", "llava_forward.py"), export, env=env).strip().splitlines()[-1])
    assert res["tower"] == "OV3VisionTower"  # built by LLaVA's build_vision_tower, not as a CLIP tower
    assert res["mm_hidden_size"] == res["hidden_size"] == 64
    assert res["num_patches"] == 16 and res["image_shape"] == [2, 3, 64, 64]  # 64px / 16 px per token = 4 x 4
    assert res["feature_shape"] == [2, 16, 64] and not res["feature_requires_grad"]  # class token dropped
    assert res["logits_len"] == res["text_len"] - 1 + res["num_patches"]  # the image token became 16 tokens
    assert res["loss"] > 0 and res["projector_grad"] > 0 and not res["tower_grads"]
    assert res["image_mean"] == [0.5, 0.5, 0.5]  # 'pad' fills with grey, as [-1, 1] training saw it


def test_patch_refuses_a_tree_that_is_not_llava(tmp_path):
    r = run_inprocess("tools/llava_patch.py", "--llava", tmp_path)
    assert r.returncode == 2 and "holds no LLaVA multimodal_encoder/builder.py" in r.stderr
