"""tools/benchmark.py on CPU at tiny size: every variant runs, the report is complete and self-consistent."""
import json
import math
import os
import subprocess
import sys

import pytest

from dist_utils import free_port, run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # times the benchmark, compiled layers included


def _bench(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), *map(str, flags)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2"))


def test_benchmark_report(tmp_path):
    out = tmp_path / "bench.json"
    r = _bench("--model-size", "tiny", "--image-size", 32, "--micro-batch-size", 4, "--tiny-vae", "--steps", 2,
               "--warmup", 1, "--pixel-loss-fraction", 0.5, "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(out))
    res = rep["results"]
    for name in ("ov3", "naive", "encoder", "encoder_local", "bare_vit", "vae_decode", "vae_decode_naive"):
        v = res[name]
        assert v["mean_s"] > 0 and v["min_s"] <= v["mean_s"]
        assert math.isclose(v["images_per_s"], 4 / v["mean_s"], rel_tol=1e-9)
        assert math.isclose(v["mfu_vs_matmul"], v["tflops_per_s"] / res["matmul"]["tflops"], rel_tol=1e-9)
        assert name in r.stdout
    # FLOPs: latent input has no VAE encode but decodes the target; the naive step encodes every step
    fast, naive = res["ov3"]["flops_per_image"], res["naive"]["flops_per_image"]
    assert "vae_encode" not in fast and fast["vae_decode_target"] > 0 and naive["vae_encode"] > 0
    assert math.isclose(fast["vae_decode"], 0.5 * naive["vae_decode"], rel_tol=1e-9)  # --pixel-loss-fraction
    parts = res["ov3"]["parts"]
    for k in ("encoder_s", "decoder_s", "vae_decode_s", "vae_decode_target_s", "text_s", "caption_s",
              "optimizer_s"):
        assert parts[k] > 0, k
    # the parts, each timed alone, add up to about the step (the leftover is reported, not forced to fit)
    measured = sum(v for k, v in parts.items() if k != "unaccounted_s")
    assert 0.25 * res["ov3"]["mean_s"] < measured < 4 * res["ov3"]["mean_s"], (measured, res["ov3"]["mean_s"])
    assert "vae_encode_s" not in parts  # latent input
    for name in ("ov3", "naive", "encoder", "vae_decode"):
        assert 0 < res[name]["mfu_vs_matmul"] <= 1, name  # FLOPs over-counted would exceed the matmul peak
    assert math.isclose(rep["ratios"]["ov3_vs_naive"], res["ov3"]["images_per_s"] / res["naive"]["images_per_s"])
    assert set(rep["ratios"]) >= {"ov3_vs_naive", "encoder_vs_bare_vit", "encoder_vs_megatron_local",
                                  "vae_decode_vs_naive"}
    assert rep["versions"]["torch"] and rep["device"].startswith("CPU") and rep["config"]["micro_batch"] == 4
    # the README table from the report
    t = run_inprocess("tools/bench_table.py", out)
    assert t.returncode == 0, t.stderr[-2000:]
    rows = {l.split("|")[1].strip(): l for l in t.stdout.splitlines() if l.startswith("| ") and "variant" not in l}
    assert set(rows) == {"ov3", "naive", "encoder", "encoder_local", "bare_vit", "vae_decode", "vae_decode_naive"}
    assert f"| {res['ov3']['images_per_s']:.1f} |" in rows["ov3"]
    assert f"ov3_vs_naive {rep['ratios']['ov3_vs_naive']:.2f}x" in t.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {}}')
    t = run_inprocess("tools/bench_table.py", bad)
    assert t.returncode == 2 and "not a tools/benchmark.py report" in t.stderr


def test_benchmark_usage_errors():
    r = run_inprocess("tools/benchmark.py", "--image-size", 30)
    assert r.returncode == 2 and "multiple of 16" in r.stderr
    r = run_inprocess("tools/benchmark.py", "--pixel-loss-fraction", 0)
    assert r.returncode == 2 and "(0, 1]" in r.stderr


def test_benchmark_tensor_parallel_through_launcher(tmp_path):
    out = tmp_path / "tp2.json"
    ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    tool = os.path.join(ROOT, "tools", "benchmark.py")
    r = subprocess.run([ds, "--num_gpus", "2", "--master_port", str(free_port()), tool,
                        "--model-size", "tiny", "--image-size", "32", "--micro-batch-size", "4", "--tiny-vae",
                        "--no-bf16", "--steps", "1", "--warmup", "1", "--no-bare", "--no-breakdown",
                        "--tensor-model-parallel-size", "2", "--json", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(out))
    assert rep["layout"] == {"tensor_parallel": 2, "data_parallel": 1}
    v = rep["results"]["ov3"]
    peak = rep["results"]["matmul"]["tflops"]
    assert v["devices"] == 2 and math.isclose(v["mfu_vs_matmul"], v["tflops_per_s"] / (2 * peak))
    d = rep["results"]["vae_decode"]  # each TP rank decodes the whole micro batch itself: per-device MFU
    assert d["devices"] == 1 and math.isclose(d["mfu_vs_matmul"], d["tflops_per_s"] / peak)
