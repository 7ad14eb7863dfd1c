"""Exact parameter counts of every tower of every named size, built on the meta device.

The table is the contract (also printed in the README); ``count_parameters`` is the analytic formula the
FLOP counter and the planner use. Both must equal what megatron-core actually builds.
"""
import pytest
import torch

from megatron_ov3.models import SIZES, build_model, get_config
from megatron_ov3.models.accounting import count_parameters

# size: (encoder, decoder, text, caption)  — trainable parameters, vocab 32000 (tiny: 512), 256px
TABLE = {
    "tiny": (108_288, 108_416, 142_080, 128_000),
    "Ti": (5_387_904, 5_388_160, 17_739_264, 21_205_248),
    "S": (21_466_368, 21_466_816, 33_760_512, 35_420_544),
    "B": (85_694_976, 85_695_808, 54_647_808, 52_142_592),
    "L": (303_425_536, 85_892_416, 110_479_872, 92_566_272),
    "So400m": (412_869_744, 85_990_720, 449_752_176, 273_319_568),
    "H": (631_400_960, 86_089_024, 336_472_064, 218_135_552),
    "g": (1_012_082_432, 86_187_328, 336_603_136, 218_266_624),
    "bigG": (1_844_241_664, 86_383_936, 672_872_960, 399_056_640),
}
TOWERS = ("encoder", "decoder", "text", "caption")


def test_table_covers_registry():
    assert set(TABLE) == set(SIZES)


@pytest.mark.parametrize("size", SIZES)
def test_exact_parameter_counts(mp1, size):
    cfg = get_config(size)
    with torch.device("meta"):
        model = build_model(cfg)
    attr = {"decoder": "latent_decoder"}  # `decoder` would collide with megatron's GPT naming in schedules
    built = {t: sum(p.numel() for p in getattr(model, attr.get(t, t)).parameters()) for t in TOWERS}
    analytic = count_parameters(cfg)
    for tower, expected in zip(TOWERS, TABLE[size]):
        assert built[tower] == expected, (size, tower, built[tower])
        assert analytic[tower] == expected, (size, tower, analytic[tower])
    assert sum(p.numel() for p in model.parameters()) == analytic["total"]


def test_open_clip_compatible_b2_count(mp1):
    """With a class token and a learned position table (the open_clip layout), OV3-B's encoder is exactly the
    released OV3-B/2 (85,893,120 parameters); with sincos positions it is the same less the 257-row table."""
    for pos, table in (("learned", 0), ("sincos", 257 * 768)):
        cfg = get_config("B", class_token=True, position_embedding_type=pos)
        with torch.device("meta"):
            model = build_model(cfg)
        n = sum(p.numel() for p in model.encoder.parameters())
        assert n + table == 85_893_120
        assert count_parameters(cfg)["encoder"] == n
