import pytest

from megatron_ov3.models import ConfigError, LayerImplConfig, OV3Config, TowerConfig, get_config


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match=r"encoder.heads=5 does not divide encoder.width=64"):
        get_config("tiny", encoder=TowerConfig(64, 2, 256, 5))


def test_image_size_multiple_of_16():
    with pytest.raises(ConfigError, match=r"image_size=250 is not a multiple of 16"):
        get_config("B", image_size=250)


def test_unknown_size():
    with pytest.raises(ValueError, match=r"model size 'XL' is unknown; choose one of tiny, Ti"):
        get_config("XL")


def test_lpips_needs_path():
    with pytest.raises(ConfigError, match="lpips_path"):
        get_config("tiny", lpips_weight=0.5)


def test_negative_weight():
    with pytest.raises(ConfigError, match="caption_weight must be >= 0"):
        get_config("tiny", caption_weight=-1.0)


def test_impl_validation():
    with pytest.raises(ConfigError, match="fp8_format 'e5m2' unknown"):
        LayerImplConfig(fp8_format="e5m2")
    with pytest.raises(ConfigError, match="transformer_impl 'cuda' unknown"):
        LayerImplConfig(transformer_impl="cuda")


def test_dict_roundtrip_and_unknown_field():
    cfg = get_config("tiny", image_size=128)
    again = OV3Config.from_dict(cfg.to_dict())
    assert again == cfg
    d = cfg.to_dict()
    d["bogus"] = 1
    with pytest.raises(ConfigError, match=r"unknown OV3Config fields \['bogus'\]"):
        OV3Config.from_dict(d)


def test_derived_token_counts():
    assert get_config("B").num_patches == 256
    assert get_config("B", image_size=128).num_patches == 64
    assert get_config("B", image_size=224).num_patches == 196
