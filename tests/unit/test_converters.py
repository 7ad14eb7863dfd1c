"""Model converters applied around a built model: torchao float8 in megatron's parallel linears (emulated on
CPU) and per-layer torch.compile. Both keep parameters and state-dict keys."""
import pytest
import torch

from helpers import random_batch, tiny_model
from megatron_ov3.converters import apply_converters, convert_to_float8, is_float8
from megatron_ov3.converters import float8 as f8
from megatron_ov3.models import LayerImplConfig

pytest.importorskip("torchao.float8", reason="torchao is not installed")
CPU = torch.device("cpu")


def _batch():
    b = random_batch(b=4)
    b["noise_seeds"] = torch.arange(4)  # the decoder's noise is a function of the batch, not of the RNG state
    return b


def _loss_and_grads(model, batch):
    out = model(batch)
    out["total_loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in out.items() if k.endswith(("_loss", "_l1"))}, grads


@pytest.mark.parametrize("cls", ["column", "row"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_float8_gemm_equals_torchao_float8_linear(mp1, cls, fmt):
    """The swapped megatron linear computes exactly what torchao's own Float8Linear computes on the same
    weight: output, input gradient and weight gradient (same quantisation, same emulated GEMMs)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    tc = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True)
    init = torch.nn.init.normal_
    lin = (ColumnParallelLinear(32, 48, config=tc, init_method=init, bias=True, gather_output=False)
           if cls == "column" else
           RowParallelLinear(32, 48, config=tc, init_method=init, bias=True, input_is_parallel=True,
                             skip_bias_add=False))
    ref = Float8Linear(32, 48, bias=True, config=f8.float8_config(fmt, emulate=True))
    with torch.no_grad():
        ref.weight.copy_(lin.weight)
        ref.bias.copy_(lin.bias)
    holder = torch.nn.Module()
    holder.lin = lin
    # a bare linear is not inside a TransformerLayer, so swap it directly the way the converter does
    lin.__class__ = f8._SWAP[type(lin)]
    lin.float8_config = f8.float8_config(fmt, emulate=True)
    lin.float8_mm_config = f8._mm_config(lin.float8_config)
    x = torch.randn(5, 3, 32) * 3
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, bias = lin(xa)
    if bias is not None:
        out = out + bias
    want = ref(xb)
    gy = torch.randn_like(want)
    out.backward(gy)
    want.backward(gy)
    assert torch.equal(out, want)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(lin.weight.grad, ref.weight.grad)
    # ... and FP8 quantisation really happened: the high-precision product differs
    assert not torch.allclose(torch.nn.functional.linear(x, ref.weight, ref.bias), want, atol=1e-4)


def test_float8_ov3_step_close_to_high_precision(fresh_seed):
    """Every transformer-layer linear of the tiny OV3 is converted (heads are not); keys are unchanged; the
    emulated FP8 losses differ from fp32 (quantisation happened) but only by FP8's error."""
    ref = tiny_model(impl=LayerImplConfig(transformer_impl="local"))
    model = tiny_model(impl=LayerImplConfig(transformer_impl="local", fp8_format="hybrid"))
    lines = apply_converters(model, LayerImplConfig(transformer_impl="local", fp8_format="hybrid"), CPU)
    layers = sum(c.depth for c in (model.cfg.encoder, model.cfg.decoder, model.cfg.text, model.cfg.caption))
    assert lines == [f"fp8-hybrid (torchao float8, emulated on CPU): {4 * layers} linears"]
    assert sum(is_float8(m) for m in model.modules()) == 4 * layers
    assert not is_float8(model.caption.lm_head)
    assert list(model.state_dict()) == list(ref.state_dict())
    batch = _batch()
    (lr, gr), (lf, gf) = _loss_and_grads(ref, batch), _loss_and_grads(model, batch)
    assert lf["contrastive_loss"] != lr["contrastive_loss"]
    for k in lr:
        assert abs(lf[k] - lr[k]) <= 0.05 * abs(lr[k]) + 1e-3, (k, lf[k], lr[k])
    a = torch.cat([gf[n].flatten() for n in gr])
    b = torch.cat([gr[n].flatten() for n in gr])
    assert float((a - b).norm() / b.norm()) < 0.25


def test_float8_refusals(mp1, monkeypatch):
    model = tiny_model(impl=LayerImplConfig(transformer_impl="local"))
    with pytest.raises(f8.Float8Unavailable, match="compute capability"):
        convert_to_float8(model, "hybrid", emulate=False, device=CPU)
    with pytest.raises(ValueError, match="fp8 format 'e5m2' is unknown"):
        convert_to_float8(model, "e5m2", emulate=True)
    monkeypatch.setattr(f8, "torchao_available", lambda: False)
    with pytest.raises(f8.Float8Unavailable, match="pip install torchao"):
        convert_to_float8(model, "hybrid", emulate=True)
    assert not any(is_float8(m) for m in model.modules())


def test_compiled_layers_equal_eager(fresh_seed):
    """torch.compile (inductor) of every transformer layer: same losses and gradients as eager, same keys; and,
    here on global rank 0 (where megatron-core's deprecation warning fired inside every row-parallel linear),
    one graph per tower shape without a graph break (19 graphs before specs.RowParallelLinear)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    assert torch.distributed.get_rank() == 0
    torch._dynamo.reset()
    counters.clear()
    ref = tiny_model(impl=LayerImplConfig(transformer_impl="local"))
    model = tiny_model(impl=LayerImplConfig(transformer_impl="local"))
    lines = apply_converters(model, LayerImplConfig(transformer_impl="local", torch_compile=True), CPU)
    layers = sum(c.depth for c in (model.cfg.encoder, model.cfg.decoder, model.cfg.text, model.cfg.caption))
    assert lines == [f"torch.compile: {layers} transformer layers"]
    assert list(model.state_dict()) == list(ref.state_dict())
    batch = _batch()
    (lr, gr), (lc, gc) = _loss_and_grads(ref, batch), _loss_and_grads(model, batch)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])  # 4 towers: at most one graph each
    for k in lr:
        assert abs(lc[k] - lr[k]) <= 1e-5 * max(1.0, abs(lr[k])), (k, lc[k], lr[k])
    for n in gr:  # inductor fuses and reorders float sums: equal to rounding
        err = float((gc[n] - gr[n]).norm() / gr[n].norm().clamp_min(1e-12))
        assert err < 1e-4, (n, err)
