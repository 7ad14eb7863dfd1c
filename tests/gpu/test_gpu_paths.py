"""GPU-only checks (skipped on CPU with the reason): bf16 and FP8 training steps, the fast VAE decode against
the eager one, and the benchmark at a real size. They assert correctness, never speed (speed is reported by
tools/benchmark.py, not asserted in tests)."""
import pytest
import torch

from helpers import random_batch
from megatron_ov3.models import FrozenVAE, LayerImplConfig, VAEDecodeConfig, build_model, get_config

pytestmark = pytest.mark.gpu


def _seed(seed: int = 0) -> None:
    """Reseed everything a model build and a step draw from, megatron's CUDA RNG tracker included (its parallel
    linears initialise their weights from it on a GPU): two builds after it are the same model."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _step(impl, dtype, convert=None):
    cfg = get_config("tiny", image_size=64)
    model = build_model(cfg, impl, vae=FrozenVAE.tiny()).cuda().to(dtype)
    model.to_frozen("cuda")
    if convert is not None:
        assert convert(model)
    batch = {k: v.cuda() for k, v in random_batch(b=16, image_size=64, vocab=cfg.vocab_size).items()}
    out = model(batch)
    out["total_loss"].backward()
    assert torch.isfinite(out["total_loss"])
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


def test_bf16_step_local_spec(mp1):
    _step(LayerImplConfig(transformer_impl="local", bf16=True), torch.bfloat16)


@pytest.mark.te
def test_fp8_hybrid_step_te_spec(mp1):
    _step(LayerImplConfig(transformer_impl="te", bf16=True, fp8_format="hybrid"), torch.bfloat16)


def test_fp8_torchao_step_local_spec(mp1):
    """Real FP8 GEMMs (torch._scaled_mm) through the torchao converter, on GPUs that have them."""
    pytest.importorskip("torchao.float8", reason="torchao is not installed")
    from megatron_ov3.converters import apply_converters, fp8_gemm_supported

    if not fp8_gemm_supported(torch.device("cuda")):
        pytest.skip("this GPU has no FP8 GEMMs (needs compute capability >= 8.9)")
    impl = LayerImplConfig(transformer_impl="local", bf16=True, fp8_format="hybrid")
    _seed()
    ref = _step(LayerImplConfig(transformer_impl="local", bf16=True), torch.bfloat16)
    _seed()
    out = _step(impl, torch.bfloat16, convert=lambda m: apply_converters(m, impl, torch.device("cuda")))
    assert abs(float(out["caption_loss"]) - float(ref["caption_loss"])) < 0.05 * float(ref["caption_loss"])


def test_compiled_layers_step(mp1):
    from megatron_ov3.converters import apply_converters

    impl = LayerImplConfig(transformer_impl="local", bf16=True, torch_compile=True)
    _step(impl, torch.bfloat16, convert=lambda m: apply_converters(m, impl, torch.device("cuda")))


def test_fast_vae_decode_matches_eager(mp1):
    vae = FrozenVAE.tiny().cuda()
    z = torch.randn(8, 16, 16, 16, device="cuda")
    ref_z = z.clone().requires_grad_(True)
    ref = vae.decode(ref_z)
    ref.square().mean().backward()
    vae.configure_decode(VAEDecodeConfig(channels_last=True, autocast_bf16=True, compile=True, checkpoint=True))
    fz = z.clone().requires_grad_(True)
    fast = vae.decode(fz)
    fast.square().mean().backward()
    assert (fast - ref).abs().max() / ref.abs().max() < 3e-2  # bf16 compute
    assert torch.nn.functional.cosine_similarity(fz.grad.flatten(), ref_z.grad.flatten(), dim=0) > 0.99


def test_benchmark_real_size(mp1):
    from megatron_ov3.perf.benchmark import Bench, BenchConfig, format_report

    bc = BenchConfig(size="B", image_size=256, micro_batch=8, steps=3, warmup=2, bare_compile=True,
                     vae_decode=VAEDecodeConfig(channels_last=True, autocast_bf16=True, compile=True))
    rep = Bench(bc, torch.device("cuda")).run()
    print(format_report(rep))
    assert {"ov3_vs_naive", "encoder_vs_bare_vit", "encoder_vs_bare_vit_compiled",
            "encoder_vs_megatron_local"} <= set(rep["ratios"])
    assert rep["results"]["ov3"]["peak_memory_mb"] > 0
