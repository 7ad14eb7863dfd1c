"""Measured mode of the scaling study: real training runs through the real launcher, next to the planner.

Each run is ``deepspeed [--hostfile H] ... --module megatron_ov3.pretrain`` with the layout's flags and
``--metrics-file``; step time and peak memory come from that file (written by rank 0 every iteration; the
peak memory is the maximum over all ranks). The first ``warmup`` iterations are dropped (start-up, JIT). The
prediction for the same layout is :func:`megatron_ov3.scaling.planner.estimate` with the given hardware profile,
ideally calibrated from ``tools/benchmark.py --json`` on the same machine (:func:`calibrate`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

from .planner import Hardware, Layout, estimate
from ..errors import UsageError
from ..records import read_jsonl


@dataclass
class RunSpec:
    """One measured run: ``N[:tpT][:ppP][:zeroZ][:mbM]``, e.g. ``4:tp2:zero1``."""

    processes: int
    tp: int = 1
    pp: int = 1
    zero: int = 1
    micro_batch: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        parts = text.split(":")
        try:
            spec = cls(int(parts[0]))
        except ValueError:
            raise UsageError(f"run spec {text!r} must start with a process count, e.g. 4 or 4:tp2:zero1") from None
        for p in parts[1:]:
            m = re.fullmatch(r"(tp|pp|zero|mb)(\d+)", p)
            if not m:
                raise UsageError(f"run spec {text!r}: unknown part {p!r}; use tpN, ppN, zeroN, mbN")
            setattr(spec, {"mb": "micro_batch"}.get(m.group(1), m.group(1)), int(m.group(2)))
        if min(spec.tp, spec.pp) < 1 or (spec.micro_batch is not None and spec.micro_batch < 1):
            raise UsageError(f"run spec {text!r}: tp, pp and mb must be >= 1")
        if spec.processes < 1:
            raise UsageError(f"run spec {text!r}: the process count must be >= 1")
        from ..config.job import ParallelConfig

        try:  # training's own layout rules
            ParallelConfig(spec.tp, spec.pp, spec.zero).validate(spec.processes)
        except UsageError as e:
            raise UsageError(f"run spec {text!r}: {e}") from None
        return spec

    def layout(self, global_batch: int) -> Layout:
        dp = self.processes // (self.tp * self.pp)
        if global_batch % dp:
            raise UsageError(f"global batch {global_batch} is not divisible by DP {dp} ({self.name})")
        mb = self.micro_batch or global_batch // dp
        if (global_batch // dp) % mb:
            raise UsageError(f"micro batch {mb} does not divide the per-rank batch {global_batch // dp} ({self.name})")
        return Layout(self.tp, self.pp, dp, self.zero, mb, "none", global_batch // (dp * mb))

    def check_nodes(self, gpus_per_node: int) -> None:
        """Across nodes (a hostfile) the launcher starts whole nodes: the count must fit that."""
        if self.processes > gpus_per_node and self.processes % gpus_per_node:
            raise UsageError(f"{self.name}: with --hostfile the process count must be at most, or a multiple of, "
                             f"the {gpus_per_node} GPUs per node")

    @property
    def name(self) -> str:
        return f"{self.processes}p TP{self.tp} PP{self.pp} ZeRO-{self.zero}"


def calibrate(hw: Hardware, bench: dict) -> Hardware:
    """A copy of ``hw`` with what ``tools/benchmark.py --json`` measured on the target machine:

    * ``peak_tflops_bf16``: the matmul peak;
    * ``efficiency``: the transformer towers' achieved fraction of it in the fast OV3 step (their FLOPs over the
      summed encoder/decoder/text/caption part times; the encoder-alone step when there is no breakdown),
      corrected for the planner's small-GEMM fall-off at the benchmark's token count;
    * ``vae_tflops_fraction``: VAE decode-with-grad FLOPs over its measured time, as a fraction of the peak;
    * ``devices_share_peak``: True when the benchmark ran on a CPU (processes share the cores).
    """
    from ..models.sizes import get_config
    from ..models.accounting import model_flops_per_sample

    res, cfg = bench["results"], bench["config"]
    tp = bench.get("layout", {}).get("tensor_parallel", 1)
    peak = res["matmul"]["tflops"]
    replica_peak = peak * tp  # the OV3/encoder variants' TFLOP/s are per model replica (TP devices)
    changes = {"name": f"{bench.get('device', hw.name)} (calibrated)", "peak_tflops_bf16": peak,
               "devices_share_peak": str(bench.get("device", "")).startswith("CPU")}
    c = get_config(cfg["size"], image_size=cfg["image_size"])
    tokens = c.num_patches * cfg["micro_batch"] / tp
    falloff = min(1.0, (tokens / hw.saturation_tokens) ** 0.5)
    parts = res.get("ov3", {}).get("parts", {})
    towers = ("encoder", "decoder", "text", "caption")
    if all(f"{t}_s" in parts for t in towers):
        flops = sum(model_flops_per_sample(c, cfg["image_size"]).values()) * cfg["micro_batch"]
        tflops = flops / sum(parts[f"{t}_s"] for t in towers) / 1e12
        changes["efficiency"] = tflops / replica_peak / falloff
    elif "encoder" in res:
        changes["efficiency"] = res["encoder"]["tflops_per_s"] / replica_peak / falloff
    if "efficiency" in changes:
        changes["efficiency"] = min(1.0, changes["efficiency"])
    flops = res.get("ov3", {}).get("flops_per_image", {})
    if parts.get("vae_decode_s") and flops.get("vae_decode"):
        vae_tflops = flops["vae_decode"] * cfg["micro_batch"] / parts["vae_decode_s"] / 1e12
        changes["vae_tflops_fraction"] = min(1.0, vae_tflops / peak)  # every TP rank decodes the whole batch
    return dataclasses.replace(hw, **changes)


def hostfile_slots(path: str) -> dict:
    """{host: slots} of a DeepSpeed hostfile, read by DeepSpeed's own parser; a bad file is a usage error."""
    from deepspeed.launcher.runner import fetch_hostfile

    if not os.path.isfile(path):
        raise UsageError(f"--hostfile {path!r} does not exist")
    try:
        pool = fetch_hostfile(path)
    except ValueError as e:
        raise UsageError(f"--hostfile {path}: {e}; each line is 'HOST slots=N'") from None
    if not pool:
        raise UsageError(f"--hostfile {path} names no host")
    return dict(pool)


def _launcher_cmd(spec: RunSpec, port: int, hostfile: Optional[str], gpus_per_node: int) -> List[str]:
    ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if hostfile:
        spec.check_nodes(gpus_per_node)
        nodes = math.ceil(spec.processes / gpus_per_node)
        where = ["--hostfile", hostfile, "--num_nodes", str(nodes),
                 "--num_gpus", str(min(spec.processes, gpus_per_node))]
    else:
        where = ["--num_gpus", str(spec.processes)]
    return [ds, *where, "--master_port", str(port), "--module", "megatron_ov3.pretrain"]


def run_measured(spec: RunSpec, *, size: str, image_size: int, global_batch: int, iters: int, out_dir: str,
                 port: int, train_flags: List[str], hostfile: Optional[str] = None, gpus_per_node: int = 8,
                 warmup: int = 1, timeout: int = 1800) -> dict:
    """Launch one run and return its measured step time, throughput and peak memory."""
    lay = spec.layout(global_batch)
    os.makedirs(out_dir, exist_ok=True)
    metrics = os.path.join(out_dir, f"metrics_{spec.processes}p_tp{spec.tp}_pp{spec.pp}_z{spec.zero}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = _launcher_cmd(spec, port, hostfile, gpus_per_node) + [
        "--model-size", size, "--image-size", str(image_size), "--micro-batch-size", str(lay.micro_batch),
        "--global-batch-size", str(global_batch), "--train-iters", str(iters + warmup), "--log-interval", "1",
        "--tensor-model-parallel-size", str(spec.tp), "--pipeline-model-parallel-size", str(spec.pp),
        "--zero-stage", str(spec.zero), "--metrics-file", metrics, *train_flags]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    # own process group: on a timeout the launcher *and* the ranks it started are killed (the port is freed)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"measured run {spec.name} did not finish in {timeout}s; killed") from None
    if proc.returncode != 0 or not os.path.exists(metrics):
        tail = (stderr or stdout)[-1500:]
        raise RuntimeError(f"measured run {spec.name} failed (exit {proc.returncode}): {tail}")
    rows = read_jsonl(metrics)[warmup:]  # the training log's own schema (training/metrics.py)
    if not rows:
        raise RuntimeError(f"measured run {spec.name} logged no iteration after the {warmup} warm-up ones")
    step = statistics.median(r_["step_time_s"] for r_ in rows)  # keys of metrics.RECORD_KEYS
    return {"spec": dataclasses.asdict(spec), "layout": dataclasses.asdict(lay), "command": shlex.join(cmd),
            "iterations": len(rows), "step_time_s": step, "samples_per_s": global_batch / step,
            "peak_memory_mb": max(r_.get("memory_mb_max_rank", r_["memory_mb"]) for r_ in rows)}


def predicted(spec: RunSpec, *, size: str, image_size: int, global_batch: int, hw: Hardware, bf16: bool,
              vae: str = "flux") -> dict:
    from ..models.sizes import get_config

    e = estimate(get_config(size, image_size=image_size), image_size, global_batch, spec.processes,
                 spec.layout(global_batch), hw, bf16=bf16, vae=vae)
    return {"step_time_s": e.step_time["total"], "samples_per_s": e.samples_per_s,
            "memory_mb": {k: v / 2 ** 20 for k, v in e.memory.items()}, "step_time_parts_s": e.step_time}


def measure_table(rows: List[dict]) -> str:
    lines = ["| run | layout | measured step s | predicted step s | measured img/s | predicted img/s | "
             "measured peak MB (process) | predicted model+act MB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lay = r["measured"]["layout"]
        lines.append(
            f"| {r['name']} | TP{lay['tp']} PP{lay['pp']} DP{lay['dp']} ZeRO-{lay['zero']} mb{lay['micro_batch']}"
            f"x{lay['grad_accum']} | {r['measured']['step_time_s']:.3f} | {r['predicted']['step_time_s']:.3f} | "
            f"{r['measured']['samples_per_s']:.1f} | {r['predicted']['samples_per_s']:.1f} | "
            f"{r['measured']['peak_memory_mb']:.0f} | {r['predicted']['memory_mb']['total']:.1f} |")
    return "\n".join(lines)


def plot_measured(rows: List[dict], out_dir: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["measured"]["spec"]["processes"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("measured", "measured", "o-"), ("predicted", "planner", "s--")):
        sps = [r[key]["samples_per_s"] for r in rows]
        axes[0].plot(n, sps, style, label=label)
        axes[1].plot(n, [s / k / (sps[0] / n[0]) for s, k in zip(sps, n)], style, label=label)
    for i, r in enumerate(rows):
        axes[0].annotate(r["name"].split(" ", 1)[1], (n[i], rows[i]["measured"]["samples_per_s"]), fontsize=7)
    axes[0].set(xlabel="processes", ylabel="images/s", title=f"throughput: {title}")
    axes[1].set(xlabel="processes", ylabel="per-process throughput vs first run", title="scaling efficiency")
    for a in axes:
        a.grid(True, alpha=0.3)
        a.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "measured.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
