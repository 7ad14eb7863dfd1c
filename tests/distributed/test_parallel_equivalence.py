"""Tensor, pipeline and data parallelism (with ZeRO 1/2/3) equal one process, and checkpoints reshard.

Every layout starts from one universal init checkpoint (tools/init_checkpoint.py) and trains the tiny OV3 for
4 steps in fp32 on --mock-data, whose global batch is the same samples under any layout (global batch 8,
no accumulation, so the contrastive loss always spans the same 8 samples). Per-step losses and the gradient
norm must equal the single-process run within 1e-5. Multi-process runs go through the real DeepSpeed launcher
(gloo): one launch per world size runs all of that size's layouts in turn (tests/distributed/layouts_worker.py,
megatron-core's parallel state re-created between them); single-process runs are in-process. Layouts that save
(every 2 steps) are also the sources of the resharded resumes.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from dist_utils import free_port, run_inprocess, subprocess_env

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS = os.path.join(os.path.dirname(sys.executable), "deepspeed")
WORKER = os.path.join(ROOT, "tests", "distributed", "layouts_worker.py")
KEYS = ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1", "grad_norm")
COMMON = ["--mock-data", "--tiny-vae", "--image-size", "32", "--micro-batch-size", "8", "--global-batch-size", "8",
          "--log-interval", "1", "--lr", "1e-3", "--clip-grad", "0", "--train-iters", "4"]

TP2, PP2 = ["--tensor-model-parallel-size", 2], ["--pipeline-model-parallel-size", 2]
LAYOUTS = {  # name -> (processes, flags, saves: a resharding source)
    "TP2": (2, TP2, False),
    "PP2": (2, PP2, False),
    "DP2-ZeRO1": (2, ["--zero-stage", 1, "--micro-batch-size", 4], False),
    "DP2-ZeRO2-overlap": (2, ["--zero-stage", 2, "--micro-batch-size", 4, "--overlap-grad-reduce"], True),
    "TP2-SP-recompute-full": (2, TP2 + ["--sequence-parallel", "--recompute-granularity", "full"], False),
    "PP2-recompute-selective": (2, PP2 + ["--recompute-granularity", "selective"], False),
    "DP2-ZeRO3": (2, ["--zero-stage", 3, "--micro-batch-size", 4], False),
    "TP2xDP2": (4, TP2 + ["--micro-batch-size", 4], False),
    "TP2xPP2": (4, TP2 + PP2, True),
    "TP2xDP2-ZeRO0": (4, TP2 + ["--micro-batch-size", 4, "--zero-stage", 0], True),
    "TP2xPP2-SP": (4, TP2 + PP2 + ["--sequence-parallel"], False),
}
RESUME_AT = {"TP1": (1, []), "TP2": (2, TP2), "TP2xPP2": (4, TP2 + PP2)}
# (saved at, resumed at): in the order they run; the first resume of a checkpoint writes its universal copy
RESHARD = [("TP1", "TP2xPP2"), ("TP2xPP2", "TP2"), ("DP2-ZeRO2-overlap", "TP2"), ("TP2xPP2", "TP1"),
           ("TP2xDP2-ZeRO0", "TP1")]
ACCUM = ["--micro-batch-size", 4]  # 2 micro-batches per step: PP2's 1F1B schedule vs one process accumulating


def _run_entry(d, name, flags, init, save):
    argv = COMMON + ["--metrics-file", d / f"{name}.jsonl", "--init-universal", init, *flags]
    if save:
        argv += ["--save", d / name, "--save-interval", 2]
    return {"name": name, "argv": [str(a) for a in argv], "rewind": str(d / name) if save else None}


def _resume_entry(d, save_layout, resume_layout):
    name = f"{save_layout}->{resume_layout}"
    argv = COMMON + ["--metrics-file", d / f"{name}.jsonl", "--load", d / save_layout, *RESUME_AT[resume_layout][1]]
    return {"name": name, "argv": [str(a) for a in argv]}


def _launch(d, world, runs):
    """One DeepSpeed launch of ``world`` processes running ``runs`` in turn; stdout per run name."""
    spec = d / f"runs_{world}.json"
    spec.write_text(json.dumps(runs))
    cmd = [DS, "--num_gpus", str(world), "--master_port", str(free_port()), WORKER, str(spec)]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(ROOT, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    parts = re.split(r"^=== run (.+) ===$", r.stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _in_process(d, entry):
    r = run_inprocess("-m", "megatron_ov3.pretrain", *entry["argv"])
    assert r.returncode == 0, r.stderr[-3000:]
    if entry.get("rewind"):
        (d / entry["name"] / "latest").write_text("iter_0000002")
    return {entry["name"]: r.stdout}


@pytest.fixture(scope="module")
def results(universal_init, tmp_path_factory):
    """Every run of this module, in dependency order: one process (in-process), 4 processes (one launch),
    2 processes (one launch), then the resumes at one process. {name: (metrics, stdout)}."""
    d, init = tmp_path_factory.mktemp("layouts"), str(universal_init)
    out = {}
    out.update(_in_process(d, _run_entry(d, "TP1", [], init, save=True)))
    out.update(_in_process(d, _run_entry(d, "TP1-accum", ACCUM, init, save=False)))
    by_world = {w: [_run_entry(d, n, f, init, s) for n, (p, f, s) in LAYOUTS.items() if p == w] for w in (2, 4)}
    by_world[2].insert(-1, _run_entry(d, "PP2-accum", PP2 + ACCUM, init, save=False))  # ZeRO-3 stays last
    for save_layout, resume_layout in RESHARD:
        w = RESUME_AT[resume_layout][0]
        if w == 1:
            continue
        by_world[w].insert(len(by_world[w]) - (w == 2), _resume_entry(d, save_layout, resume_layout))
    out.update(_launch(d, 4, by_world[4]))
    out.update(_launch(d, 2, by_world[2]))
    for save_layout, resume_layout in RESHARD:
        if RESUME_AT[resume_layout][0] == 1:
            out.update(_in_process(d, _resume_entry(d, save_layout, resume_layout)))
    return {name: ([json.loads(l) for l in open(d / f"{name}.jsonl")], stdout) for name, stdout in out.items()}


def _assert_same(ref, got, tol=1e-5):
    assert [m["iteration"] for m in got] == [m["iteration"] for m in ref]
    for a, b in zip(ref, got):
        for k in KEYS:
            assert abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])), (a["iteration"], k, a[k], b[k])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, results):
    got, out = results[name]
    _assert_same(results["TP1"][0], got)
    # the parameter count in the log is real under every layout (ZeRO-3 empties the partitioned tensors)
    counts = [int(c.replace(",", "")) for c in re.findall(r"([\d,]+) trainable params", out)]
    assert counts and min(counts) > 0, out[-2000:]


def test_pipeline_with_accumulation_matches_single_process(results):
    """PP2 with 2 micro-batches per step (1F1B schedule) against one process accumulating the same 2
    micro-batches: per-step losses (the logged mean over micro-batches) and gradient norm within 1e-5."""
    _assert_same(results["TP1-accum"][0], results["PP2-accum"][0])


@pytest.mark.parametrize("flags,words", [(["--zero-stage", "2"], "use --zero-stage 1"),
                                         (["--zero-stage", "0"], "--zero-stage 0 cannot be combined")])
def test_pipeline_refuses_zero2_and_zero0(flags, words):
    r = run_inprocess("-m", "megatron_ov3.pretrain", *COMMON, "--pipeline-model-parallel-size", "2", *flags,
                      env={"WORLD_SIZE": "2"})
    assert r.returncode == 2 and words in r.stderr, r.stderr


@pytest.mark.parametrize("save_layout,resume_layout", RESHARD)
def test_resharded_resume_continues_like_uninterrupted(save_layout, resume_layout, results):
    """Saved at one layout after 2 of 4 steps, resumed at another for the last 2: the same losses as the 4
    uninterrupted steps. The save wrote DeepSpeed's files only; the first resume of a checkpoint makes its universal
    copy from them (from_deepspeed), later ones reuse it."""
    resumed, out = results[f"{save_layout}->{resume_layout}"]
    first = next(p for p in RESHARD if p[0] == save_layout) == (save_layout, resume_layout)
    assert "resharded from" in out and "at iteration 2" in out, out[-2000:]
    assert ("wrote the universal copy" in out) == first, out[-2000:]
    _assert_same(results[save_layout][0][2:], resumed)
