"""Cluster planner: memory per GPU and step time of every (TP, PP, DP, ZeRO, micro-batch, recompute) layout.

Memory per GPU (the most loaded rank: the last pipeline stage, which holds its encoder share plus the decoder,
text and caption towers):
* model states, per parameter P of the rank's shard, DP = data-parallel size — the accounting of DeepSpeed's
  ``estimate_zero*_model_states_mem_needs`` helpers, per precision:
    bf16: ZeRO-0 20P | ZeRO-1 4P + 16P/DP | ZeRO-2 2P + 18P/DP | ZeRO-3 18P/DP + 4*largest layer
          (2 bf16 params, 2 bf16 grads, 4 fp32 grads, 4 fp32 master, 8 Adam moments; for ZeRO-3 the bf16
          parameter shards are, as in DeepSpeed's helper, covered by the gathered-layer buffer)
    fp32: ZeRO-0 16P | ZeRO-1 8P + 12P/DP | ZeRO-2 4P + 16P/DP | ZeRO-3 20P/DP + 4*largest layer
* activations per transformer layer and micro-batch (Korthikanti et al. 2022, no sequence parallelism),
  s tokens, h width, a heads, t = TP:  s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes; selective recompute drops the
  attention-score term; full recompute keeps 2*s*b*h (the layer input). Under 1F1B the first stage holds up
  to PP micro-batches in flight; the last stage one.
* the VAE decoder's activations for the pixel loss (kept for backward): ``vae_decode_act_bytes_per_pixel`` of
  the hardware profile (an assumption, calibrate it with a measured peak-memory number) x pixels x micro-batch.

Step time = compute / (peak x efficiency) x recompute factor, plus tensor-parallel all-reduces (4 per layer per
micro-batch over NVLink), plus the pipeline bubble (PP-1)/(m+PP-1), plus data-parallel gradient reduction
(ring, 2(DP-1)/DP x gradient bytes over InfiniBand when DP spans nodes, NVLink otherwise; ZeRO-3 adds the
parameter all-gathers) not hidden by ``dp_overlap``.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config.job import ParallelConfig
from ..models.config import OV3Config
from ..models.accounting import count_parameters, layer_params, model_flops_per_sample
from ..models.sizes import get_config
from ..models.stages import stage_layout
from ..errors import MissingFile, UsageError


@dataclass
class Hardware:
    """A GPU/cluster profile; values are per GPU unless named otherwise."""

    name: str = "H100-SXM-80GB"
    peak_tflops_bf16: float = 989.0
    """Dense bf16 peak (the datasheet's; a measured matmul peak is lower: calibrate with ``examples/gpu_check.sh``,
    nothing here was measured on a GPU)."""
    peak_tflops_fp8: float = 1979.0
    hbm_gb: float = 80.0
    usable_memory_fraction: float = 0.9
    """Share of HBM the planner may fill (allocator fragmentation, CUDA context, NCCL buffers)."""
    gpus_per_node: int = 8
    nvlink_gbps: float = 450.0
    """Achievable NVLink all-reduce bus bandwidth, GB/s."""
    ib_gbps: float = 50.0
    """Achievable inter-node bandwidth per GPU, GB/s (400 Gb/s NDR)."""
    efficiency: float = 0.45
    """Fraction of peak the transformer math reaches (an assumption, typical of published ViT-H MFU; not measured
    here: calibrate it from a GPU benchmark)."""
    vae_tflops_fraction: float = 0.25
    """Fraction of peak the VAE convolutions reach (an assumption: convolutions with grad run well below matmul
    rate; not measured on a GPU here, calibrate it)."""
    vae_decode_act_bytes_per_pixel: float = 6000.0
    """VAE decoder activation bytes kept for backward per output pixel (assumption; calibrate)."""
    dp_overlap: float = 0.5
    """Fraction of data-parallel communication hidden behind backward compute."""
    saturation_tokens: int = 16384
    """Tokens per micro-batch (per TP rank) at which the GEMMs reach ``efficiency``; below it efficiency falls
    as sqrt(tokens / saturation_tokens) (small GEMMs underfill the GPU)."""
    microbatch_overhead_s: float = 0.004
    """Fixed cost per micro-batch and stage (kernel launches, optimizer-free bookkeeping, p2p latency)."""
    devices_share_peak: bool = False
    """True for CPU processes: the processes of one node share one peak (the cores) instead of each owning a
    GPU; compute time then scales with the processes per node (set by calibration from a CPU benchmark)."""

    @classmethod
    def from_yaml(cls, path: str) -> "Hardware":
        import yaml

        if not os.path.isfile(path):
            raise MissingFile(f"--hardware {path!r} does not exist; give a YAML file of {{key: number}}")
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise UsageError(f"--hardware {path!r} is not valid YAML{at}; write one 'key: number' per line") from None
        if not isinstance(d, dict):
            raise UsageError(f"--hardware {path!r} holds a {type(d).__name__}, not a mapping of 'key: number'")
        known = {f.name: f.default for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - set(known))
        if bad:
            raise UsageError(f"hardware profile {path!r} has unknown keys {bad}; known: {sorted(known)}")
        wrong = sorted(k for k, v in d.items() if isinstance(known[k], (int, float))
                       and (isinstance(v, bool) or not isinstance(v, (int, float))))
        if wrong:
            raise UsageError(f"--hardware {path!r}: {wrong[0]} must be a number, got {d[wrong[0]]!r}")
        return cls(**d)


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    recompute: str  # none | selective | full
    grad_accum: int = 1


@dataclass
class Estimate:
    layout: Layout
    memory: Dict[str, float]
    step_time: Dict[str, float]
    samples_per_s: float
    fits: bool


def _tower_shards(cfg: OV3Config, tp: int, pp: int) -> Dict[str, float]:
    """Parameters on the last pipeline stage's rank (its encoder share + the towers it owns whole), by tower."""
    n = count_parameters(cfg)
    last = stage_layout(cfg, pp)[-1]
    start, end = last.encoder_layers
    return {"encoder": n["encoder"] * (end - start) / cfg.encoder.depth / tp,
            **{t: n[t] / tp for t in last.towers}}


def model_state_bytes(params: float, dp: int, zero: int, bf16: bool, largest_layer: float = 0.0) -> Dict[str, float]:
    """Bytes of parameters, gradients and optimizer state on one rank holding ``params`` parameters."""
    if bf16:
        table = {0: (2, 2 + 4, 4 + 8), 1: (2, 2, (4 + 4 + 8) / dp), 2: (2, (2 + 4) / dp, 12 / dp),
                 3: (0.0, (2 + 4) / dp, 12 / dp)}
    else:
        table = {0: (4, 4, 8), 1: (4, 4, 12 / dp), 2: (4, 4 / dp, 12 / dp), 3: (4 / dp, 4 / dp, 12 / dp)}
    p, g, o = table[zero]
    out = {"params": p * params, "grads": g * params, "optimizer": o * params}
    if zero == 3:
        out["params"] += 4 * largest_layer  # a gathered layer
    return out


def _act_layer(s: int, b: int, h: int, a: int, t: int, recompute: str) -> float:
    if recompute == "full":
        return 2.0 * s * b * h
    core = 10 + 24 / t
    if recompute == "none":
        core += 5 * a * s / (h * t)
    return s * b * h * core


def activation_bytes(cfg: OV3Config, image_size: int, lay: Layout, hw: Hardware, pixel_loss: bool = True) -> float:
    n = cfg.tokens_at(image_size) + cfg.num_prefix_tokens
    e, d, tx, c = cfg.encoder, cfg.decoder, cfg.text, cfg.caption
    b = lay.micro_batch
    enc_layer = _act_layer(n, b, e.width, e.heads, lay.tp, lay.recompute)
    enc = enc_layer * e.depth / lay.pp
    in_flight_last = 1
    others = (_act_layer(n, b, d.width, d.heads, lay.tp, lay.recompute) * d.depth
              + _act_layer(cfg.text_context_length, b, tx.width, tx.heads, lay.tp, lay.recompute) * tx.depth
              + _act_layer(n + cfg.caption_length, b, c.width, c.heads, lay.tp, lay.recompute) * c.depth)
    vae = hw.vae_decode_act_bytes_per_pixel * image_size ** 2 * b if pixel_loss else 0.0
    last_stage = enc * in_flight_last + others + vae
    first_stage = enc * min(lay.pp, lay.grad_accum) if lay.pp > 1 else last_stage
    return max(first_stage, last_stage)


def estimate(cfg: OV3Config, image_size: int, global_batch: int, world: int, lay: Layout, hw: Hardware,
             bf16: bool = True, fp8: bool = False, vae: str = "flux") -> Estimate:
    """``vae``: 'flux' (the FLUX.1 VAE's FLOPs) or 'tiny' (the toy VAE of CPU runs, for measured-mode checks)."""
    shards = _tower_shards(cfg, lay.tp, lay.pp)
    params = sum(shards.values())
    largest = layer_params(cfg.encoder.width, cfg.encoder.mlp) / lay.tp
    mem = model_state_bytes(params, lay.dp, lay.zero, bf16, largest)
    mem["activations"] = activation_bytes(cfg, image_size, lay, hw)
    total = sum(mem.values())
    mem["total"] = total
    fits = total <= hw.hbm_gb * 1e9 * hw.usable_memory_fraction

    # compute
    flops = model_flops_per_sample(cfg, image_size)
    transformer = sum(flops.values()) * global_batch / world
    recompute_factor = {"none": 1.0, "selective": 1.03, "full": 4.0 / 3.0}[lay.recompute]
    peak = (hw.peak_tflops_fp8 if fp8 else hw.peak_tflops_bf16) * 1e12
    tokens = cfg.tokens_at(image_size) * lay.micro_batch / lay.tp
    eff = hw.efficiency * min(1.0, (tokens / hw.saturation_tokens) ** 0.5)
    share = min(world, hw.gpus_per_node) if hw.devices_share_peak else 1
    t_compute = transformer * recompute_factor * share / (peak * eff) + hw.microbatch_overhead_s * lay.grad_accum
    # the frozen VAE (encode + decode with grad) of the replica's whole batch: it is not split by tensor
    # parallelism (every TP rank runs it on the full micro-batch) and under pipelining the last stage does it all
    vae_flops = _vae_flops_per_image(image_size, vae, cfg.pixel_loss_fraction) * global_batch / lay.dp
    t_vae = vae_flops * share / (hw.peak_tflops_bf16 * 1e12 * hw.vae_tflops_fraction)
    # tensor-parallel all-reduces: 4 per layer per micro-batch (2 fwd, 2 bwd), ring over NVLink
    n_tok = cfg.tokens_at(image_size)
    act = n_tok * lay.micro_batch * cfg.encoder.width * 2
    layers = cfg.encoder.depth / lay.pp + cfg.decoder.depth + cfg.text.depth + cfg.caption.depth
    ring = 2 * (lay.tp - 1) / lay.tp * act / (hw.nvlink_gbps * 1e9)  # one all-reduce of the activations
    t_tp = 0.0 if lay.tp == 1 else 4 * layers * lay.grad_accum * ring
    # pipeline bubble
    bubble = (lay.pp - 1) / (lay.grad_accum + lay.pp - 1) if lay.pp > 1 else 0.0
    # data-parallel gradient reduction (+ parameter all-gathers for ZeRO-3)
    grad_bytes = params * (2 if bf16 else 4)
    mp = lay.tp * lay.pp
    dp_bw = hw.nvlink_gbps if lay.dp * mp <= hw.gpus_per_node else hw.ib_gbps
    comm = 2 * (lay.dp - 1) / lay.dp * grad_bytes * (1.5 if lay.zero == 3 else 1.0) if lay.dp > 1 else 0.0
    t_dp = comm / (dp_bw * 1e9) * (1 - hw.dp_overlap)
    busy = t_compute + t_vae + t_tp
    step = busy / (1 - bubble) + t_dp
    times = {"compute": t_compute, "vae": t_vae, "tensor_parallel_comm": t_tp,
             "pipeline_bubble": busy / (1 - bubble) - busy, "data_parallel_comm": t_dp, "total": step}
    return Estimate(lay, mem, times, global_batch / step, fits)


def _vae_flops_per_image(image_size: int, vae: str = "flux", pixel_loss_fraction: float = 1.0) -> float:
    """Frozen-VAE FLOPs of one training sample with image input: encode + (decode forward + decode backward to
    the input, ~1x forward) for the pixel-loss share of the batch, counted for the FLUX.1 architecture or the
    toy VAE (models/accounting.py)."""
    from ..models.accounting import flux_vae_flops, tiny_vae_flops

    enc, dec = flux_vae_flops(image_size) if vae == "flux" else tiny_vae_flops(image_size)
    return enc + 2 * dec * pixel_loss_fraction


def layouts(cfg: OV3Config, world: int, global_batch: int, gpus_per_node: int,
            micro_batches=(1, 2, 4, 8, 16, 32, 64)) -> List[Layout]:
    out = []
    for tp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16)):
        if tp > gpus_per_node or cfg.encoder.depth % pp:
            continue
        if any(t.heads % tp for t in (cfg.encoder, cfg.decoder, cfg.text, cfg.caption)):
            continue
        dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
        for mb, zero, rc in itertools.product(micro_batches, (0, 1, 2, 3), ("none", "selective", "full")):
            if not ParallelConfig(tp, pp, zero).is_valid(world, cfg):  # training's own layout rules
                continue
            if global_batch % (mb * dp):
                continue
            out.append(Layout(tp, pp, dp, zero, mb, rc, global_batch // (mb * dp)))
    return out


def plan(size: str, nodes: List[int], hw: Hardware, image_size: int = 256, global_batch: Optional[int] = None,
         per_gpu_batch: Optional[int] = None, mode: str = "strong", bf16: bool = True, fp8: bool = False,
         top: int = 3) -> List[dict]:
    """For each node count: the best layouts by throughput among those that fit (weak: per-GPU batch fixed;
    strong: global batch fixed)."""
    cfg = get_config(size, image_size=image_size)
    rows = []
    for n in nodes:
        world = n * hw.gpus_per_node
        gb = per_gpu_batch * world if mode == "weak" else global_batch
        ests = [estimate(cfg, image_size, gb, world, lay, hw, bf16, fp8)
                for lay in layouts(cfg, world, gb, hw.gpus_per_node)]
        # fastest first; among equally fast layouts the one needing less memory
        fit = sorted((e for e in ests if e.fits), key=lambda e: (-round(e.samples_per_s, 6), e.memory["total"]))
        rows.append({"nodes": n, "gpus": world, "global_batch": gb, "candidates": len(ests), "fitting": len(fit),
                     "best": [_row(e) for e in fit[:top]]})
    return rows


def _row(e: Estimate) -> dict:
    return {"layout": dataclasses.asdict(e.layout), "samples_per_s": e.samples_per_s,
            "memory_gb": {k: v / 1e9 for k, v in e.memory.items()}, "step_time_s": e.step_time}
