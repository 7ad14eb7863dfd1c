"""examples/gpu_check.sh --dry-run: the script a GPU machine runs, every part at tiny size on the CPU, so the first
GPU run does not spend its minutes on a wrong flag. Also the benchmark with torchao FP8 (emulated) and compiled
layers: the fast step timed without FP8 and with eager layers in the same run, with the ratios (this replaces
test_benchmark.py's own run of those flags)."""
import json
import math
import os
import subprocess
import sys

import pytest

from dist_utils import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # three launcher runs, an export and a benchmark, as on the GPU


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    """About 150 s: the only run of the GPU script's own commands (each part's tools are tested alone elsewhere)."""
    env = subprocess_env(ROOT, OV3_PYTHON=sys.executable)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    r = subprocess.run(["bash", "examples/gpu_check.sh", str(tmp_path / "out"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    s = json.load(open(tmp_path / "out" / "summary.json"))
    logs = {p["part"]: (tmp_path / "out" / f"{p['part']}.log").read_text()[-3000:] for p in s["parts"]}
    assert [p["part"] for p in s["parts"]] == ["facts", "pytest", "train", "fp8_compile", "bench"]
    assert s["all_parts_ok"], (s["parts"], logs)
    assert sum(p["limit_s"] for p in s["parts"]) <= 540  # the 9 minutes of one GPU machine
    assert s["facts"]["ok"] and s["facts"]["cpu_shim_active"] and s["facts"]["dry_run"]
    assert "skipped" in s["pytest"]  # tests/gpu skip on a CPU, with their reason
    assert s["resume"]["ok"] and s["resume"]["iterations"] == [3, 4], s["resume"]
    assert {"config.json", "model.safetensors"} <= set(s["export_files"])
    rep = json.load(open(tmp_path / "out" / "bench.json"))
    res, ratios = rep["results"], rep["ratios"]
    assert rep["config"]["layers"]["fp8_format"] == "hybrid" and rep["config"]["layers"]["torch_compile"] is True
    for name in ("ov3", "ov3_no_fp8", "ov3_eager_layers"):
        assert res[name]["images_per_s"] > 0
    assert math.isclose(ratios["fp8_vs_no_fp8"], res["ov3"]["images_per_s"] / res["ov3_no_fp8"]["images_per_s"])
    assert math.isclose(ratios["compiled_vs_eager_layers"],
                        res["ov3"]["images_per_s"] / res["ov3_eager_layers"]["images_per_s"])
    assert s["bench_ratios"] == ratios
