"""The torchao float8 converter keeps megatron's tensor-parallel communication: with FP8 scaling disabled (the
GEMMs become exact), a converted TP2 block - with and without sequence parallelism - computes what megatron's
own TP2 block computes: outputs, input gradients and every parameter gradient. The FP8 quantisation itself is
checked against torchao's Float8Linear in tests/unit/test_converters.py."""
import pytest
import torch

from dist_utils import free_port, run_distributed

pytest.importorskip("torchao.float8", reason="torchao is not installed")
pytestmark = pytest.mark.distributed


def _worker(rank, world):
    from torchao.float8 import CastConfig, Float8LinearConfig, ScalingType

    from megatron_ov3 import parallel
    from megatron_ov3.converters import convert_to_float8, is_float8
    from megatron_ov3.models import LayerImplConfig, get_config
    from megatron_ov3.models.transformer import build_block, run_block

    off = CastConfig(scaling_type=ScalingType.DISABLED)
    exact = Float8LinearConfig(cast_config_input=off, cast_config_weight=off, cast_config_grad_output=off,
                               emulate=True)
    parallel.initialize_model_parallel(2, 1, seed=0)
    tower = get_config("tiny").encoder
    for sp in (False, True):
        impl = LayerImplConfig(transformer_impl="local", sequence_parallel=sp)
        block = build_block(tower, impl, causal=False, eps=1e-6,
                            name="encoder", sequence_parallel=sp)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 16, tower.width, generator=g)
        gy = torch.randn(2, 16, tower.width, generator=g)
        runs = []
        for convert in (False, True):
            if convert:
                assert convert_to_float8(block, "hybrid", emulate=True, config=exact) == 4 * tower.depth
                assert sum(is_float8(m) for m in block.modules()) == 4 * tower.depth
            block.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = run_block(block, xi)
            y.backward(gy)
            runs.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
        (y0, gx0, gp0), (y1, gx1, gp1) = runs
        assert torch.allclose(y1, y0, atol=1e-6, rtol=1e-5), (sp, float((y1 - y0).abs().max()))
        assert torch.allclose(gx1, gx0, atol=1e-6, rtol=1e-5), (sp, float((gx1 - gx0).abs().max()))
        for n in gp0:
            assert torch.allclose(gp1[n], gp0[n], atol=1e-6, rtol=1e-5), (sp, n)


def test_float8_converter_keeps_tp_and_sp_communication():
    run_distributed(_worker, 2, free_port(), timeout=180)
