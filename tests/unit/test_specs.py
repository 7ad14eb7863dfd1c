import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_ov3.models import LayerImplConfig, TowerConfig
from megatron_ov3.models.specs import SDPAttention, layer_spec, resolve_backend, te_available
from megatron_ov3.models.transformer import build_block, run_block


def test_auto_backend_without_te_is_local():
    if te_available():
        pytest.skip("Transformer Engine is installed here")
    assert resolve_backend("auto") == "local"
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        resolve_backend("te")


def test_mask_types():
    enc = layer_spec("local", causal=False)
    cap = layer_spec("local", causal=True)
    assert enc.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.no_mask
    assert cap.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.causal
    assert enc.submodules.self_attention.submodules.core_attention is SDPAttention


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_unfused_megatron_attention(mp1, causal):
    tower = TowerConfig(64, 2, 128, 4)
    torch.manual_seed(0)
    a = build_block(tower, LayerImplConfig(attention_backend="sdpa"), causal=causal, eps=1e-6, name="t")
    b = build_block(tower, LayerImplConfig(attention_backend="unfused"), causal=causal, eps=1e-6, name="t")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 10, 64)
    if causal:  # megatron's unfused path needs an explicit causal mask (True = masked)
        mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)[None, None]
        yb = b(x.transpose(0, 1), attention_mask=mask).transpose(0, 1)
    else:
        yb = run_block(b, x)
    ya = run_block(a, x)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)


def test_causal_block_is_causal(mp1):
    blk = build_block(TowerConfig(64, 2, 128, 4), LayerImplConfig(), causal=True, eps=1e-6, name="t")
    x = torch.randn(2, 12, 64)
    y1 = run_block(blk, x)
    x2 = x.clone()
    x2[:, 8:] += 1.0
    y2 = run_block(blk, x2)
    torch.testing.assert_close(y1[:, :8], y2[:, :8])
    assert not torch.allclose(y1[:, 8:], y2[:, 8:])


@pytest.mark.gpu
@pytest.mark.te
def test_te_spec_builds_and_runs(mp1):
    from megatron_ov3.models import build_model, get_config

    cfg = get_config("tiny", image_size=64)
    model = build_model(cfg, LayerImplConfig(transformer_impl="te")).cuda()
    out = model.encoder(torch.randn(2, 16, 8, 8, device="cuda"))
    assert out.tokens.shape == (2, 16, 64)
