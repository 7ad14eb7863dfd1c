"""Whole-step benchmark of OV3 training against, in the same run, a naive OV3 step, a bare PyTorch ViT of the
encoder's shape, megatron-core's local-spec encoder and the device's matmul peak.

Every number is measured here, in this process, on this device; nothing is looked up or estimated. A *step*
is forward + backward + AdamW step of every tower with every loss, with bf16 parameters and optimizer state
when ``bf16`` (as megatron-core layers want; the same for every variant, the bare ViT included: no fp32
master copy, so the optimizer part is cheaper than under DeepSpeed's bf16 engine), no DeepSpeed engine and
no data loading: batches are synthetic tensors already on the device.

Variants timed:

* ``ov3``: the configured fast step: latent input (what latent shards give: no VAE encode), fused SDPA or
  Transformer Engine layers, the VAE decode options of :class:`~megatron_ov3.models.vae.VAEDecodeConfig`,
  fused AdamW on CUDA, optional FP8 (TE, or torchao float8 with the local backend), per-layer
  ``torch.compile`` and recomputation. With FP8 the same step without FP8 is timed too (``ov3_no_fp8``), and
  with compiled layers the same step with eager layers (``ov3_eager_layers``).
* ``naive``: the reference: images in (VAE encode every step), megatron's unfused softmax attention, the VAE
  in bf16 eager, the pixel loss decoding the whole batch, for-loop AdamW.
* ``encoder``: the encoder alone (fwd + bwd + AdamW of its parameters), as configured, and ``encoder_local``:
  the same with megatron-core's local spec and unfused attention (the megatron baseline).
* ``bare_vit`` (and ``bare_vit_compiled``): ``torch.nn.TransformerEncoderLayer`` pre-LN stack of the
  encoder's width/depth/MLP/heads on the same token count, fwd + bwd + AdamW.
* ``vae_decode`` and ``vae_decode_naive``: the VAE decode with gradient to the latents (what the pixel loss
  costs) on the whole micro batch, with the fast step's decode options and as diffusers eager with bf16
  weights (the naive step's).
* ``matmul``: square GEMM throughput (bf16 on GPU), the ceiling MFU is also reported against.

Per-part times (VAE encode, encoder, decoder, VAE decode, text, caption, optimizer) are each timed in
isolation with the step's inputs, so they add up to about the step time; the rest is reported as
``unaccounted``.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..converters import apply_converters
from ..models import FrozenVAE, LayerImplConfig, VAEDecodeConfig, build_model, get_config
from ..models.accounting import step_flops_per_sample, tower_forward_flops, vae_fwd_flops
from ..errors import UsageError


@dataclass
class BenchConfig:
    """What to benchmark. Field defaults are the fast configuration on a GPU."""

    size: str = "tiny"
    """Named model size from the registry."""
    image_size: int = 256
    """Training resolution in pixels."""
    micro_batch: int = 32
    """Images per step (per data-parallel rank)."""
    steps: int = 10
    """Timed iterations per variant."""
    warmup: int = 3
    """Untimed iterations before timing (compilation, autotuning, allocator warm-up)."""
    layers: LayerImplConfig = field(default_factory=lambda: LayerImplConfig(bf16=True))
    """How the fast step's layers are realised (training's own section: backend, attention, bf16, FP8, compile,
    recomputation); ``layers.bf16`` also sets every other variant's precision (False: fp32)."""
    input: str = "latents"
    """'latents' (latent-cache input, no VAE encode in the step) or 'images' (VAE encode every step)."""
    pixel_loss_fraction: float = 1.0
    """Fraction of the batch decoded for the pixel loss in the fast step (1.0 = the paper)."""
    vae_decode: VAEDecodeConfig = field(default_factory=VAEDecodeConfig)
    """VAE decoder options of the fast step."""
    vae_path: Optional[str] = None
    """Local FLUX.1 VAE folder; None: a random-init VAE of the full FLUX architecture (same cost)."""
    tiny_vae: bool = False
    """Use the toy VAE (CPU tests)."""
    naive: bool = True
    """Also time the naive reference step."""
    bare: bool = True
    """Also time the bare PyTorch ViT and the encoder-alone variants."""
    bare_compile: bool = False
    """Also time ``torch.compile`` of the bare ViT."""
    vae_decode_alone: bool = True
    """Also time the VAE decode with gradient alone, fast options against diffusers eager bf16."""
    breakdown: bool = True
    """Time each part of the fast step in isolation."""
    peak_tflops: Optional[float] = None
    """Vendor peak (e.g. 989 for H100 SXM dense bf16) for a second MFU figure; the measured matmul peak is
    always reported."""
    find_max_micro_batch: bool = False
    """Search the largest micro batch that fits (CUDA only), with and without full recomputation."""
    seed: int = 0
    """Seed of the synthetic batch and of the model initialisation."""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], steps: int, warmup: int, device) -> Dict[str, float]:
    """Mean / min seconds per call of ``fn`` after ``warmup`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"mean_s": sum(times) / len(times), "min_s": min(times)}


def _autocast(device, bf16: bool):
    """Only for the frozen VAE's encode and the VAE decode parts (the trained modules hold bf16 weights)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def synthetic_batch(cfg, b: int, image_size: int, device, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, image_size // 8, image_size // 8, generator=g) * 2 - 1
    images = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    batch = {
        "images": images,
        "text_ids": torch.randint(4, cfg.vocab_size, (b, cfg.text_context_length), generator=g),
        "caption_ids": torch.randint(4, cfg.vocab_size, (b, cfg.caption_length), generator=g),
        "noise_seeds": torch.arange(b, dtype=torch.int64) + seed,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _optimizer(params, device, fused: bool):
    params = [p for p in params if p.requires_grad]
    if device.type == "cuda" and fused:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    return torch.optim.AdamW(params, lr=1e-4, foreach=fused)


def _train_step(model, opt, batch):
    def step():
        opt.zero_grad(set_to_none=True)
        model(batch)["total_loss"].backward()
        opt.step()
    return step


class BareViT(torch.nn.Module):
    """Pre-LN ViT stack from ``torch.nn.TransformerEncoderLayer`` (GELU MLP, SDPA attention inside)."""

    def __init__(self, width: int, depth: int, mlp: int, heads: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True, layer_norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = torch.nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def matmul_peak_tflops(device, steps: int = 20) -> Dict[str, float]:
    """Throughput of a square GEMM: n=8192 bf16 on GPU; n=1024 fp32 on CPU (CPU bf16 GEMMs are not native)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, steps, 3, device)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / t["min_s"] / 1e12}


def _versions() -> Dict[str, Optional[str]]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("megatron-core", "transformer-engine", "deepspeed", "diffusers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "NVML_SUCCESS == r INTERNAL ASSERT FAILED")
"""How an allocation failure reads when it is not a ``torch.cuda.OutOfMemoryError``: cuBLAS and cuDNN report
their own allocation failures, and the caching allocator's NVML assert fires under memory pressure."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is the GPU running out of memory (so the max-micro-batch search tries a smaller batch)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or any(m in str(e) for m in OOM_MARKERS)


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """Largest ``b`` in [1, limit] with ``fits(b)`` (0 if none), assuming fitting is monotone: doubling from
    1, then bisection between the last size that fitted and the first that did not."""
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class Bench:
    def __init__(self, bc: BenchConfig, device: torch.device):
        if bc.input not in ("latents", "images"):
            raise UsageError(f"input must be 'latents' or 'images', got {bc.input!r}")
        self.bc, self.device = bc, device
        self.cfg = get_config(bc.size, image_size=bc.image_size, pixel_loss_fraction=bc.pixel_loss_fraction)
        torch.manual_seed(bc.seed)
        if bc.tiny_vae:
            self.vae = FrozenVAE.tiny()
        elif bc.vae_path:
            self.vae = FrozenVAE.from_pretrained(bc.vae_path)
        else:
            self.vae = FrozenVAE.from_config(seed=bc.seed)  # the full FLUX architecture, random weights
        self.vae.to(device)
        self.batch = synthetic_batch(self.cfg, bc.micro_batch, bc.image_size, device, bc.seed)
        with _autocast(device, bc.layers.bf16):
            self.batch["latents"] = self.vae.encode(self.batch["images"]).float()
        self.results: Dict[str, dict] = {}

    # ---------------------------------------------------------------- variants
    @property
    def dtype(self):
        return torch.bfloat16 if self.bc.layers.bf16 else torch.float32

    def _impl(self, **kw):
        bc = self.bc
        return dataclasses.replace(bc.layers, **kw)

    def _baseline_impl(self):
        """megatron-core's local spec with its unfused softmax attention; no FP8, no compile, no recomputation."""
        return self._impl(transformer_impl="local", attention_backend="unfused", fp8_format=None, torch_compile=False,
                          recompute_granularity=None)

    def _vae(self, decode: VAEDecodeConfig, bf16_weights: bool = False):
        """A copy of the benchmark's VAE with these decode options (``self.vae`` stays plain for the baselines)."""
        vae = copy.deepcopy(self.vae).configure_decode(decode)
        return vae.to(torch.bfloat16) if bf16_weights else vae

    def _model(self, cfg, impl, vae):
        model = build_model(cfg, impl, vae=vae).to(self.device, self.dtype)
        apply_converters(model, impl, self.device)  # torchao float8 / per-layer compile, as training does
        return model

    def _record(self, name, t, images, flops_per_image, extra=None):
        r = dict(t)
        r["images_per_s"] = images / t["mean_s"]
        if flops_per_image is not None:
            r["tflops_per_s"] = flops_per_image * images / t["mean_s"] / 1e12
        r["peak_memory_mb"] = _peak_mb(self.device)
        r.update(extra or {})
        self.results[name] = r
        return r

    def fast_step(self, name: str = "ov3", breakdown: Optional[bool] = None, **impl_overrides):
        bc, dev = self.bc, self.device
        breakdown = bc.breakdown if breakdown is None else breakdown
        vae = self._vae(bc.vae_decode)
        model = self._model(self.cfg, self._impl(**impl_overrides), vae)
        batch = {k: v for k, v in self.batch.items() if not (bc.input == "latents" and k == "images")}
        if bc.input == "images":
            batch.pop("latents")
        opt = _optimizer(model.parameters(), dev, fused=True)
        _reset_peak(dev)
        t = timed(_train_step(model, opt, batch), bc.steps, bc.warmup, dev)
        flops = step_flops_per_sample(self.cfg, bc.image_size, self.vae, encode_in_step=bc.input == "images",
                                      micro_batch=bc.micro_batch)
        self._record(name, t, bc.micro_batch, flops["total"], {"flops_per_image": flops})
        if breakdown:
            self.results[name]["parts"] = self._parts(model, opt, batch)
            parts = self.results[name]["parts"]
            parts["unaccounted_s"] = t["mean_s"] - sum(v for k, v in parts.items() if k.endswith("_s"))
        model = opt = vae = None  # free the variant's memory before the next one

    def naive_step(self):
        bc, dev = self.bc, self.device
        cfg = get_config(bc.size, image_size=bc.image_size)  # full pixel loss
        vae = self._vae(VAEDecodeConfig(), bf16_weights=bc.layers.bf16)
        model = self._model(cfg, self._baseline_impl(), vae)
        batch = {k: v for k, v in self.batch.items() if k != "latents"}
        opt = _optimizer(model.parameters(), dev, fused=False)
        _reset_peak(dev)
        t = timed(_train_step(model, opt, batch), bc.steps, bc.warmup, dev)
        flops = step_flops_per_sample(cfg, bc.image_size, self.vae, encode_in_step=True, micro_batch=bc.micro_batch)
        self._record("naive", t, bc.micro_batch, flops["total"], {"flops_per_image": flops})
        model = opt = vae = None  # free the variant's memory before the next one

    def _encoder_step(self, name, impl):
        bc, dev = self.bc, self.device
        model = self._model(self.cfg, impl, None)
        enc = model.encoder
        opt = _optimizer(enc.parameters(), dev, fused=True)
        z = self.batch["latents"]

        def step():
            opt.zero_grad(set_to_none=True)
            out = enc(z)
            (out.tokens.float().mean() + out.embedding.float().mean()).backward()
            opt.step()

        _reset_peak(dev)
        t = timed(step, bc.steps, bc.warmup, dev)
        self._record(name, t, bc.micro_batch, self._encoder_flops())
        model = opt = None  # free the variant's memory before the next one

    def _encoder_flops(self):
        cfg = self.cfg
        n = cfg.seq_length
        return 3.0 * tower_forward_flops(cfg.encoder, n)

    def bare_vit(self, compiled: bool):
        bc, dev = self.bc, self.device
        e = self.cfg.encoder
        model = BareViT(e.width, e.depth, e.mlp, e.heads).to(dev, self.dtype)
        fwd = torch.compile(model) if compiled else model
        opt = _optimizer(model.parameters(), dev, fused=True)
        x = torch.randn(bc.micro_batch, self.cfg.seq_length, e.width, device=dev,
                        dtype=self.dtype)

        def step():
            opt.zero_grad(set_to_none=True)
            fwd(x).float().mean().backward()
            opt.step()

        _reset_peak(dev)
        t = timed(step, bc.steps, bc.warmup, dev)
        self._record("bare_vit_compiled" if compiled else "bare_vit", t, bc.micro_batch, self._encoder_flops())
        model = opt = None  # free the variant's memory before the next one

    def vae_decode(self, name: str, decode: VAEDecodeConfig, bf16_weights: bool):
        """Decode the micro batch's latents and backpropagate to them (the VAE is frozen: no weight grads)."""
        bc, dev = self.bc, self.device
        vae = self._vae(decode, bf16_weights)
        z = self.batch["latents"].clone().to(torch.bfloat16 if bf16_weights else torch.float32)
        z.requires_grad_(True)

        def step():
            z.grad = None
            vae.decode(z).float().mean().backward()

        _reset_peak(dev)
        t = timed(step, bc.steps, bc.warmup, dev)
        _, dec = vae_fwd_flops(self.vae, bc.image_size)
        self._record(name, t, bc.micro_batch, 2.0 * dec)
        vae = None  # free the variant's memory before the next one

    # ---------------------------------------------------------------- per-part breakdown
    def _parts(self, model, opt, batch) -> Dict[str, float]:
        bc, dev = self.bc, self.device
        cfg = self.cfg
        n, w = bc.steps, bc.warmup
        out: Dict[str, float] = {}
        z = self.batch["latents"]
        images = self.batch["images"]

        def part(name, fn):
            out[name + "_s"] = timed(fn, n, w, dev)["mean_s"]

        if bc.input == "images":
            def vae_encode():  # as the step runs it: at the VAE's own dtype (the decode options are decode-only)
                model.vae.encode(images)
            part("vae_encode", vae_encode)
        # each part is the model's own public sub-step of forward (OV3Model), timed with its backward
        with torch.no_grad():
            enc = model.encode_image(latents=z)  # inputs of the later parts, without a graph
            z_hat = model.predict_latents(enc.tokens)

        def encoder():
            o = model.encode_image(latents=z)
            (o.tokens.float().mean() + o.embedding.float().mean()).backward()

        def decoder():
            model.predict_latents(enc.tokens, batch["noise_seeds"]).float().mean().backward()

        zk = z_hat.clone().requires_grad_(True)

        def vae_decode():  # the VAE's own decode options (autocast, channels-last, compile) apply inside
            model.decode_prediction(zk).mean().backward()

        def vae_decode_target():
            model.pixel_target(z, None)

        def text():
            model.contrastive_losses(enc, batch)["contrastive_loss"].backward()

        def caption():
            model.caption_losses(enc, batch)["caption_loss"].backward()

        part("encoder", encoder)
        part("decoder", decoder)
        if cfg.pixel_l1_weight > 0:
            part("vae_decode", vae_decode)
            if bc.input == "latents":
                part("vae_decode_target", vae_decode_target)
        part("text", text)
        part("caption", caption)
        part("optimizer", opt.step)  # every parameter has a gradient from the parts above
        opt.zero_grad(set_to_none=True)
        return out

    # ---------------------------------------------------------------- largest micro batch
    def max_micro_batch(self, recompute: Optional[str], limit: int = 4096) -> Optional[int]:
        """Largest micro batch whose fast step runs without CUDA OOM (doubling, then bisection)."""
        import torch.distributed as dist

        if self.device.type != "cuda":
            return None
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise UsageError("--find-max-micro-batch runs in one process (an OOM on one rank would leave the others "
                             "waiting in a collective); run it without the launcher")
        bc, dev = self.bc, self.device
        vae = self._vae(bc.vae_decode)

        def fits(b):
            model = opt = None
            try:
                model = self._model(self.cfg, self._impl(recompute_granularity=recompute), vae)
                opt = _optimizer(model.parameters(), dev, fused=True)
                batch = synthetic_batch(self.cfg, b, bc.image_size, dev, bc.seed)
                with _autocast(dev, bc.layers.bf16):
                    batch["latents"] = vae.encode(batch.pop("images")).float()
                _train_step(model, opt, batch)()
                _sync(dev)
                return True
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; cuBLAS/cuDNN say it their way
                if not is_out_of_memory(e):
                    raise
                return False
            finally:
                del model, opt
                torch.cuda.empty_cache()

        return largest_fitting(fits, limit)

    # ---------------------------------------------------------------- all
    def run(self) -> dict:
        bc, dev = self.bc, self.device
        self.results["matmul"] = matmul_peak_tflops(dev)
        self.fast_step()
        if bc.layers.fp8_format:
            self.fast_step("ov3_no_fp8", breakdown=False, fp8_format=None)
        if bc.layers.torch_compile:
            self.fast_step("ov3_eager_layers", breakdown=False, torch_compile=False)
        if bc.naive:
            self.naive_step()
        if bc.bare:
            self._encoder_step("encoder", self._impl())
            self._encoder_step("encoder_local", self._baseline_impl())
            self.bare_vit(False)
            if bc.bare_compile:
                self.bare_vit(True)
        if bc.vae_decode_alone and self.cfg.pixel_l1_weight > 0:
            self.vae_decode("vae_decode", bc.vae_decode, bf16_weights=False)
            self.vae_decode("vae_decode_naive", VAEDecodeConfig(), bf16_weights=bc.layers.bf16)
        if bc.find_max_micro_batch:
            self.results["max_micro_batch"] = {"no_recompute": self.max_micro_batch(None),
                                               "recompute_full": self.max_micro_batch("full")}
        return self.report()

    def report(self) -> dict:
        """Results, ratios and MFU. Under tensor parallelism the OV3/encoder variants run on TP devices per model
        replica (their TFLOP/s are per replica, their MFU per device); the bare ViT always runs on one device,
        so the encoder-vs-bare ratios are like for like only at TP 1."""
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        r = self.results
        peak = r["matmul"]["tflops"]
        for name, v in r.items():
            if isinstance(v, dict) and "tflops_per_s" in v:
                devices = 1 if name.startswith(("bare_vit", "vae_decode")) else tp  # not split by TP
                v["devices"] = devices
                v["mfu_vs_matmul"] = v["tflops_per_s"] / (peak * devices)
                if self.bc.peak_tflops:
                    v["mfu_vs_spec"] = v["tflops_per_s"] / (self.bc.peak_tflops * devices)
        ratios = {}

        def ratio(key, a, b):
            if a in r and b in r:
                ratios[key] = r[a]["images_per_s"] / r[b]["images_per_s"]

        ratio("ov3_vs_naive", "ov3", "naive")
        ratio("fp8_vs_no_fp8", "ov3", "ov3_no_fp8")
        ratio("compiled_vs_eager_layers", "ov3", "ov3_eager_layers")
        ratio("vae_decode_vs_naive", "vae_decode", "vae_decode_naive")
        ratio("encoder_vs_bare_vit", "encoder", "bare_vit")
        ratio("encoder_vs_bare_vit_compiled", "encoder", "bare_vit_compiled")
        ratio("encoder_vs_megatron_local", "encoder", "encoder_local")
        bc = asdict(self.bc)
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": _device_name(self.device), "versions": _versions(), "config": bc,
            "results": r, "ratios": ratios,
            "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def format_report(rep: dict) -> str:
    """Human-readable summary of :meth:`Bench.report`."""
    r, c = rep["results"], rep["config"]
    lay = rep.get("layout", {})
    lines = [f"OV3-{c['size']} {c['image_size']}px, micro batch {c['micro_batch']}, "
             f"TP {lay.get('tensor_parallel', 1)} x DP {lay.get('data_parallel', 1)}, "
             f"{'bf16' if c['layers']['bf16'] else 'fp32'}, input {c['input']}, on {rep['device']} ({rep['date']})",
             f"matmul peak: {r['matmul']['tflops']:.2f} TFLOP/s ({r['matmul']['dtype']}, n={r['matmul']['n']})",
             f"{'variant':<20}{'step ms':>10}{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak MB':>10}"]
    for name, v in r.items():
        if not (isinstance(v, dict) and "mean_s" in v):
            continue
        mem = v.get("peak_memory_mb")
        lines.append(f"{name:<20}{v['mean_s'] * 1e3:>10.1f}{v['images_per_s']:>10.1f}"
                     f"{v.get('tflops_per_s', float('nan')):>10.3f}{v.get('mfu_vs_matmul', float('nan')):>8.1%}"
                     f"{(f'{mem:.0f}' if mem is not None else 'n/a'):>10}")
    parts = r.get("ov3", {}).get("parts")
    if parts:
        total = r["ov3"]["mean_s"]
        lines.append("ov3 step by part: " + ", ".join(
            f"{k[:-2]} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in parts.items()))
    for k, v in rep["ratios"].items():
        lines.append(f"{k}: {v:.2f}x")
    if "max_micro_batch" in r:
        lines.append(f"largest micro batch: {r['max_micro_batch']}")
    return "\n".join(lines)


def format_markdown(reports: List[dict]) -> str:
    """The README's performance table from one or more ``--json`` reports: one row per variant, then the ratios
    and the largest micro batches, each report headed by its device, date, versions and configuration."""
    out = []
    for rep in reports:
        c, r, v = rep["config"], rep["results"], rep["versions"]
        lay = c["layers"]
        head = (f"OV3-{c['size']} {c['image_size']}px, micro batch {c['micro_batch']}, "
                f"{'bf16' if lay['bf16'] else 'fp32'}, input {c['input']}, layers {lay['transformer_impl']}"
                f"{', fp8-' + lay['fp8_format'] if lay.get('fp8_format') else ''}"
                f"{', compiled' if lay.get('torch_compile') else ''}"
                f"{', recompute ' + lay['recompute_granularity'] if lay.get('recompute_granularity') else ''}")
        out += [f"**{head}** - {rep['device']}, {rep['date']}, torch {v.get('torch')}, "
                f"megatron-core {v.get('megatron-core')}, TE {v.get('transformer-engine') or 'absent'}, "
                f"matmul peak {r['matmul']['tflops']:.1f} TFLOP/s", "",
                "| variant | step ms | images/s | TFLOP/s | MFU (matmul peak) | MFU (spec) | peak GiB |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for name, x in r.items():
            if not (isinstance(x, dict) and "mean_s" in x):
                continue
            mem = x.get("peak_memory_mb")
            cell = lambda k, f: f.format(x[k]) if x.get(k) is not None else "-"  # noqa: E731
            out.append(f"| {name} | {x['mean_s'] * 1e3:.1f} | {x['images_per_s']:.1f} | "
                       f"{cell('tflops_per_s', '{:.1f}')} | {cell('mfu_vs_matmul', '{:.1%}')} | "
                       f"{cell('mfu_vs_spec', '{:.1%}')} | {f'{mem / 1024:.1f}' if mem is not None else '-'} |")
        if rep["ratios"]:
            out += ["", "ratios: " + ", ".join(f"{k} {x:.2f}x" for k, x in rep["ratios"].items())]
        if "max_micro_batch" in r:
            out += ["", "largest micro batch: " + ", ".join(f"{k} {x}" for k, x in r["max_micro_batch"].items())]
        out.append("")
    return "\n".join(out)


def run_benchmark(bc: BenchConfig, device: Optional[torch.device] = None) -> dict:
    device = device or torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return Bench(bc, device).run()


__all__: List[str] = ["BenchConfig", "Bench", "BareViT", "run_benchmark", "format_report", "format_markdown",
                      "timed", "largest_fitting", "matmul_peak_tflops"]
