"""The largest-micro-batch search of tools/benchmark.py --find-max-micro-batch (its OOM probe needs CUDA; the
search itself is checked here against every threshold, with the number of probes it costs)."""
import math

import pytest

from megatron_ov3.perf.benchmark import largest_fitting


@pytest.mark.parametrize("limit", [1, 7, 64, 4096])
def test_largest_fitting_finds_every_threshold(limit):
    for threshold in list(range(0, 70)) + [1000, 4095, 4096, 5000]:
        probes = []

        def fits(b):
            probes.append(b)
            return b <= threshold

        assert largest_fitting(fits, limit) == min(threshold, limit)
        assert all(1 <= b <= limit for b in probes)
        assert len(probes) <= 2 * math.ceil(math.log2(limit + 1)) + 2  # doubling + bisection, not a scan
