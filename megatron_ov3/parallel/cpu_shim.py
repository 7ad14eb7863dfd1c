"""CPU shim for megatron-core: the only place that lets megatron-core run without CUDA.

megatron-core allocates a few buffers with ``device=torch.cuda.current_device()``, keeps its tensor-parallel
RNG tracker in CUDA RNG states, creates a ``device="cuda"`` scalar in every pipeline schedule and calls
``torch.cuda.synchronize()`` in p2p communication and checkpoint saving. On a machine without CUDA each of
these raises "Torch not compiled with CUDA enabled". :func:`install` maps them to their CPU equivalents:

* ``torch.cuda.current_device()`` returns the CPU device (megatron only passes it as ``device=``);
* the CUDA RNG get/set/seed functions act on the CPU generator, so the RNG tracker's ``fork()`` switches CPU
  RNG streams exactly as it switches CUDA streams on a GPU (dropout stays reproducible per TP rank);
* ``torch.cuda.synchronize()`` is a no-op (CPU ops are synchronous);
* ``torch.zeros(..., device="cuda")`` in megatron's pipeline schedules gets the CPU device;
* the default causal mask of megatron's unfused softmax attention (built with ``device="cuda"``) is built on
  the CPU.

It does nothing when CUDA is available, and calling it twice is harmless. Nothing else in the package
touches these functions.
"""
from __future__ import annotations

import functools

import torch

_INSTALLED = False


def needed() -> bool:
    """True when this process has no usable CUDA device (the shim is then required)."""
    return not torch.cuda.is_available()


def _cpu_device(*_args, **_kwargs):
    return torch.device("cpu")


def _get_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def _set_rng_state(new_state, *_args, **_kwargs):
    torch.set_rng_state(new_state)


def _manual_seed(seed, *_args, **_kwargs):
    torch.default_generator.manual_seed(int(seed))


def _cpu_zeros(orig_zeros):
    @functools.wraps(orig_zeros)
    def zeros(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return orig_zeros(*args, **kwargs)

    return zeros


def active() -> bool:
    """Whether the CPU substitutions are installed in this process (never on a GPU machine)."""
    return _INSTALLED


def install() -> bool:
    """Install the CPU substitutions if CUDA is unavailable. Returns True if the shim is active."""
    global _INSTALLED
    if not needed():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = _cpu_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = _manual_seed

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _get_rng_state
    mcore_random._set_cuda_rng_state = _set_rng_state

    # Pipeline schedules build `torch.zeros([], dtype=torch.int, device="cuda")`; patch only their `torch`.
    from megatron.core.pipeline_parallel import schedules

    class _SchedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

    sched_torch = _SchedTorch()
    sched_torch.zeros = _cpu_zeros(torch.zeros)
    schedules.torch = sched_torch

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=None)
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    transformer_utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask
    _INSTALLED = True
    return True
