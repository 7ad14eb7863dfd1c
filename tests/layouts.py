"""Training runs at many parallel layouts, few launches: the runs behind tests/distributed/test_parallel_equivalence.py
(and the trained checkpoints tests/e2e/test_convert.py exports), made once per session by the ``layout_runs``
fixture. One DeepSpeed launch per world size runs all of that size's layouts in turn
(tests/distributed/layouts_worker.py, megatron-core's parallel state re-created between them); single-process runs
are in-process. Layouts that save (every 2 steps) are also the sources of the resharded resumes."""
import json
import os
import re
import subprocess
import sys

from dist_utils import free_port, run_inprocess, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
# the trained checkpoints tests/e2e/test_convert.py exports (a class token; the PP2 one with a learned position
# table at a 4x4 grid, used resized to the 2x2 grid of 32px), made in the 2-process launch
EXPORT_COMMON = ["--mock-data", "--tiny-vae", "--image-size", "32", "--class-token", "--micro-batch-size", "4",
                 "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-2"]
EXPORT_SOURCES = {"export-TP2": TP2, "export-PP2": PP2 + ["--position-embedding-type", "learned",
                                                          "--pos-embed-ref-grid", 4]}


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


def run_all(d, init: str) -> dict:
    """Every run, in dependency order: one process (in-process), 4 processes (one launch), 2 processes (one
    launch), then the resumes at one process. {name: (metrics, stdout)}; checkpoints under ``d / name``."""
    out = {}
    out.update(_in_process(d, _run_entry(d, "TP1", [], init, save=True)))
    out.update(_in_process(d, _run_entry(d, "TP1-accum", ACCUM, init, save=False)))
    by_world = {w: [_run_entry(d, n, f, init, s) for n, (p, f, s) in LAYOUTS.items() if p == w] for w in (2, 4)}
    by_world[2].insert(-1, _run_entry(d, "PP2-accum", PP2 + ACCUM, init, save=False))  # ZeRO-3 stays last
    by_world[2][:0] = [dict(name=n, argv=[str(a) for a in EXPORT_COMMON + ["--save", d / n, "--metrics-file",
                                                                           d / f"{n}.jsonl", *f]])
                       for n, f in EXPORT_SOURCES.items()]
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
