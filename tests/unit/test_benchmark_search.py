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


def test_out_of_memory_is_recognised_in_every_form_the_search_meets():
    """The max-micro-batch search tries a smaller batch on an allocation failure, whichever library reports it,
    and lets every other error through."""
    import torch

    from megatron_ov3.perf.benchmark import is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
