"""Tensor, pipeline and data parallelism (with ZeRO 1/2/3) equal one process, and checkpoints reshard.

Every layout starts from one universal init checkpoint (tools/init_checkpoint.py) and trains the tiny OV3 for
3 steps in fp32 on --mock-data, whose global batch is the same samples under any layout (global batch 8,
no accumulation, so the contrastive loss always spans the same 8 samples). Per-step losses and the gradient
norm must equal the single-process run within 1e-5. Runs go through the real DeepSpeed launcher (gloo).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from dist_utils import free_port, subprocess_env

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS = os.path.join(os.path.dirname(sys.executable), "deepspeed")
KEYS = ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1", "grad_norm")
COMMON = ["--mock-data", "--tiny-vae", "--image-size", "32", "--micro-batch-size", "8", "--global-batch-size", "8",
          "--log-interval", "1", "--lr", "1e-3", "--clip-grad", "0"]


def _run(nproc, port, out, *flags, timeout=400):
    env = subprocess_env(ROOT, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_ov3.pretrain"]
    else:
        cmd = [DS, "--num_gpus", str(nproc), "--master_port", str(port), "--module", "megatron_ov3.pretrain"]
    cmd += COMMON + ["--metrics-file", str(out)] + [str(f) for f in flags]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return [json.loads(l) for l in open(out)], r.stdout


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "init_checkpoint.py"), "--image-size", "32",
                        "--output", str(d)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    return str(d / "universal")


@pytest.fixture(scope="module")
def reference(init, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    metrics, _ = _run(1, 0, d / "m.jsonl", "--train-iters", 3, "--init-universal", init)
    return metrics


def _assert_same(ref, got, tol=1e-5):
    assert [m["iteration"] for m in got] == [m["iteration"] for m in ref]
    for a, b in zip(ref, got):
        for k in KEYS:
            assert abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])), (a["iteration"], k, a[k], b[k])


LAYOUTS = {
    "TP2": (2, ["--tensor-model-parallel-size", 2]),
    "PP2": (2, ["--pipeline-model-parallel-size", 2]),
    "DP2-ZeRO1": (2, ["--zero-stage", 1, "--micro-batch-size", 4]),
    "DP2-ZeRO2-overlap": (2, ["--zero-stage", 2, "--micro-batch-size", 4, "--overlap-grad-reduce"]),
    "DP2-ZeRO3": (2, ["--zero-stage", 3, "--micro-batch-size", 4]),
    "TP2xDP2": (4, ["--tensor-model-parallel-size", 2, "--micro-batch-size", 4]),
    "TP2xPP2": (4, ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2]),
    "TP2-SP-recompute-full": (2, ["--tensor-model-parallel-size", 2, "--sequence-parallel",
                                  "--recompute-granularity", "full"]),
    "PP2-recompute-selective": (2, ["--pipeline-model-parallel-size", 2, "--recompute-granularity", "selective"]),
    "TP2xDP2-ZeRO0": (4, ["--tensor-model-parallel-size", 2, "--micro-batch-size", 4, "--zero-stage", 0]),
    "TP2xPP2-SP": (4, ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2,
                       "--sequence-parallel"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, init, reference, tmp_path):
    nproc, flags = LAYOUTS[name]
    port = 29700 + list(LAYOUTS).index(name)
    got, out = _run(nproc, port, tmp_path / "m.jsonl", "--train-iters", 3, "--init-universal", init, *flags)
    _assert_same(reference, got)
    # the parameter count in the log is real under every layout (ZeRO-3 empties the partitioned tensors)
    counts = [int(c.replace(",", "")) for c in re.findall(r"([\d,]+) trainable params", out)]
    assert counts and min(counts) > 0, out[-2000:]


def test_pipeline_with_accumulation_matches_single_process(init, tmp_path):
    """PP2 with 2 micro-batches per step (1F1B schedule) against one process accumulating the same 2
    micro-batches: per-step losses (the logged mean over micro-batches) and gradient norm within 1e-5."""
    flags = ["--train-iters", 3, "--init-universal", init, "--micro-batch-size", 4]
    ref, _ = _run(1, 0, tmp_path / "ref.jsonl", *flags)
    got, _ = _run(2, 29755, tmp_path / "pp.jsonl", *flags, "--pipeline-model-parallel-size", 2)
    _assert_same(ref, got)


def test_pipeline_refuses_zero2(init, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE="2")
    r = subprocess.run([sys.executable, "-m", "megatron_ov3.pretrain", *COMMON, "--train-iters", "1",
                        "--pipeline-model-parallel-size", "2", "--zero-stage", "2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "use --zero-stage 1" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "megatron_ov3.pretrain", *COMMON, "--train-iters", "1",
                        "--pipeline-model-parallel-size", "2", "--zero-stage", "0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--zero-stage 0 cannot be combined" in r.stderr, r.stderr


RESHARD = {  # layout -> (processes, flags); global batch 8 in every one
    "TP1xPP1": (1, []),
    "TP2xPP1": (2, ["--tensor-model-parallel-size", 2]),
    "TP2xPP2": (4, ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2]),
    "DP2-ZeRO2": (2, ["--zero-stage", 2, "--micro-batch-size", 4]),
    "DP2-ZeRO0": (2, ["--zero-stage", 0, "--micro-batch-size", 4]),
}


def _flags(layout):
    return RESHARD[layout]


_CACHE = {}


def _straight_and_saved(layout, init, tmp_path_factory):
    """4 uninterrupted steps at ``layout`` saving after steps 2 and 4, with ``latest`` then pointed back at step 2
    (what a user does to resume from an earlier checkpoint): the reference and the checkpoint in one run (cached)."""
    if layout not in _CACHE:
        d = tmp_path_factory.mktemp(f"save_{layout}")
        n, f = _flags(layout)
        straight, _ = _run(n, free_port(), d / "a.jsonl", "--train-iters", 4, "--save-interval", 2, "--save",
                           d / "ck", "--init-universal", init, *f)
        (d / "ck" / "latest").write_text("iter_0000002")
        _CACHE[layout] = (straight, d)
    return _CACHE[layout]


@pytest.mark.parametrize("save_layout,resume_layout", [
    ("TP2xPP2", "TP1xPP1"), ("TP2xPP2", "TP2xPP1"), ("TP1xPP1", "TP2xPP2"), ("DP2-ZeRO2", "TP2xPP1"),
    ("DP2-ZeRO0", "TP1xPP1"),
])
def test_resharded_resume_continues_like_uninterrupted(save_layout, resume_layout, init, tmp_path,
                                                       tmp_path_factory):
    """Save at one layout after 2 steps, resume at another for 2 more: same losses as 4 uninterrupted steps. The
    save writes DeepSpeed's files only; the resume makes the universal copy from them (from_deepspeed)."""
    straight, d = _straight_and_saved(save_layout, init, tmp_path_factory)
    n2, f2 = _flags(resume_layout)
    made = (d / "ck" / "iter_0000002" / "universal").exists()  # by an earlier resume of the same checkpoint
    resumed, out = _run(n2, free_port(), tmp_path / "b.jsonl", "--train-iters", 4, "--load", d / "ck", *f2)
    assert ("resharded from" in out) == (save_layout != resume_layout), out[-2000:]
    assert ("wrote the universal copy" in out) == (save_layout != resume_layout and not made), out[-2000:]
    assert "at iteration 2" in out
    _assert_same(straight[2:], resumed)
