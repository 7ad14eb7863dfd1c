"""Measured mode of tools/scaling_study.py: 1 and 4 CPU processes through the real DeepSpeed launcher, read back
from their metrics files, next to the planner calibrated from tools/benchmark.py --json (2 processes, over two
hosts, through the same tool: tests/multinode/test_two_hosts.py)."""
import json
import math
import os
import subprocess
import sys

import pytest

from dist_utils import free_port, run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _tool(name, *flags, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, flags)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT))


def test_measured_runs_next_to_calibrated_prediction(tmp_path):
    bench = tmp_path / "bench.json"
    r = run_inprocess("tools/benchmark.py", "--model-size", "tiny", "--image-size", 32, "--micro-batch-size", 8,
                      "--tiny-vae", "--no-bf16", "--steps", 3, "--warmup", 2, "--no-naive", "--no-bare", "--json",
                      bench)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "study"
    r = _tool("scaling_study.py", "--model-size", "tiny", "--image-size", 32, "--global-batch-size", 8,
              "--measure", 1, 4, "--measure-iters", 2, "--calibrate", bench, "--master-port", free_port(),
              "--output", out)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rep = json.load(open(out / "measured.json"))
    b = json.load(open(bench))
    hw = rep["hardware"]
    assert hw["peak_tflops_bf16"] == b["results"]["matmul"]["tflops"] and hw["devices_share_peak"] is True
    assert [run["measured"]["spec"]["processes"] for run in rep["runs"]] == [1, 4]
    for run, dp in zip(rep["runs"], (1, 4)):
        m, p = run["measured"], run["predicted"]
        assert m["layout"]["dp"] == dp and m["layout"]["micro_batch"] == 8 // dp
        assert m["iterations"] == 2 and m["step_time_s"] > 0 and m["peak_memory_mb"] > 0
        assert math.isclose(m["samples_per_s"], 8 / m["step_time_s"])
        assert p["step_time_s"] > 0 and p["memory_mb"]["total"] > 0
        assert "--num_gpus" in m["command"] and "megatron_ov3.pretrain" in m["command"]
    assert (out / "measured.png").stat().st_size > 0
    assert "| 4p TP1 PP1 ZeRO-1 |" in r.stdout


@pytest.mark.parametrize("flags,words", [
    (["--model-size", "tiny", "--measure", "3:tp2"], "are not divisible by TP"),
    (["--model-size", "tiny", "--measure", "2:fast"], "unknown part 'fast'"),
    (["--model-size", "tiny", "--measure", "4:tp0"], "tp, pp and mb must be >= 1"),
    (["--model-size", "tiny", "--global-batch-size", 0], "--global-batch-size must be >= 1"),
    (["--calibrate", "none.json"], "write it with tools/benchmark.py --json"),
])
def test_measured_mode_usage_errors(flags, words):
    r = run_inprocess("tools/scaling_study.py", *flags)
    assert r.returncode == 2 and words in r.stderr, r.stderr
