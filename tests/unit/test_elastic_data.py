"""The elastic data order (issue 28): the global batches are the same samples, in the same order, at any
data-parallel size and loader worker count, and a position saved at DP 4 resumes at DP 2 (and at DP 1 with two
workers) consuming exactly the uninterrupted run's samples. Real tar shards, the loaders' own worker processes."""
import dataclasses

import pytest

from megatron_ov3.data import DataConfig
from megatron_ov3.data.elastic import ElasticIterator, auto_streams, merge_states, why_not_elastic
from megatron_ov3.errors import UsageError

G, M = 8, 2  # global batch, micro-batch


def _cfg(tiny_data, workers):
    spec, tok = tiny_data
    return DataConfig(data_path=spec, tokenizer=tok, micro_batch_size=M, image_size=32, num_workers=workers,
                      shuffle_buffer=16, seed=5)


def _steps(cfg, dp, steps, state=None, streams=8):
    """``steps`` global batches (sample keys, ranks in order) at DP ``dp``, and the merged state after them."""
    its = [ElasticIterator(cfg, r, dp, G, streams, state) for r in range(dp)]
    out = []
    for _ in range(steps):
        out.append([k for it in its for _ in range(G // dp // M) for k in next(it)["noise_seeds"].tolist()])
    return out, merge_states([it.state_dict() for it in its])


def test_global_batches_do_not_depend_on_the_layout(tiny_data):
    straight, _ = _steps(_cfg(tiny_data, 1), 4, 6)
    assert all(len(b) == G and len(set(b)) == G for b in straight)
    assert len({k for b in straight for k in b}) == 6 * G  # no sample twice within an epoch's share
    for dp, workers in ((2, 2), (1, 2), (4, 2), (1, 0)):
        got, _ = _steps(_cfg(tiny_data, workers), dp, 6)
        assert got == straight, (dp, workers)


def test_saved_at_dp4_resumes_exactly_at_dp2_and_dp1(tiny_data):
    straight, _ = _steps(_cfg(tiny_data, 1), 4, 8)
    first, state = _steps(_cfg(tiny_data, 1), 4, 4)
    assert first == straight[:4]
    for dp, workers in ((2, 2), (1, 2)):
        rest, _ = _steps(_cfg(tiny_data, workers), dp, 4, state)
        assert rest == straight[4:], (dp, workers)


def test_layouts_that_cannot_be_elastic_say_why(tiny_data):
    cfg = _cfg(tiny_data, 1)
    assert auto_streams(8, 8) == 8 and auto_streams(4096, 100_000) == 1024 and auto_streams(24, 5) == 4
    assert why_not_elastic(cfg, 8, G, 4, 8, 1) is None
    assert "multiple of the data-parallel size 3" in why_not_elastic(cfg, 8, 24, 3, 8, 1)
    assert "exceeds the 1 streams" in why_not_elastic(dataclasses.replace(cfg, num_workers=2), 8, G, 8, 8, 1)
    assert "several weighted sources" in why_not_elastic(cfg, 8, G, 2, 8, 2)
    with pytest.raises(UsageError):
        next(ElasticIterator(dataclasses.replace(cfg, micro_batch_size=3), 0, 1, G, 8))
