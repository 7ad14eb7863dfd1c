"""torchao float8 training for megatron-core's parallel linears (the FP8 path when Transformer Engine is absent).

torchao's ``convert_to_float8_training`` swaps ``torch.nn.Linear`` modules; megatron-core's
``ColumnParallelLinear`` / ``RowParallelLinear`` are not ``nn.Linear`` (their forward returns ``(output, bias)``
and carries the tensor-parallel communication). So the converter here swaps their class for a subclass whose
``_forward_impl`` - the local GEMM megatron calls between its collectives - runs torchao's float8 matmul with
dynamic scaling, and keeps the tensor-parallel communication the fused megatron GEMM does inside itself:

* sequence parallel column linears: all-gather the input along the sequence (reduce-scatter its gradient);
* tensor parallel column linears: identity forward, all-reduce of the input gradient;
* row linears: nothing inside (megatron reduces their output outside ``_forward_impl``).

Parameters, state-dict keys and checkpoints do not change; only the GEMMs do. Scales are per tensor and per
tensor-parallel shard (each rank quantises its own weight shard and, for row linears, its own input shard).

Formats (``--fp8-format``): ``hybrid`` = E4M3 input and weight, E5M2 gradient (torchao's default recipe, like
TE's hybrid); ``e4m3`` = E4M3 everywhere. Real FP8 GEMMs need CUDA compute capability 8.9+ (H100, H200,
L40S, RTX 4090); elsewhere the GEMMs can be *emulated* (``emulate=True``: the same quantisation, fp32 matmul),
which is what CPU runs and tests use - correct numerics, no speed-up.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel import RowParallelLinear as _CoreRowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from ..models.specs import RowParallelLinear

FORMATS = ("hybrid", "e4m3")


class Float8Unavailable(ValueError):
    """FP8 was asked for but cannot run here (no torchao, or a GPU without FP8 GEMMs): a usage error."""


def torchao_available() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except Exception:
        return False
    return True


def fp8_gemm_supported(device: torch.device) -> bool:
    """True when ``device`` has hardware FP8 GEMMs (CUDA compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def float8_config(fmt: str, emulate: bool):
    """torchao ``Float8LinearConfig`` for ``fmt`` (hybrid | e4m3), tensorwise dynamic scaling."""
    if fmt not in FORMATS:
        raise ValueError(f"fp8 format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    from torchao.float8 import CastConfig, Float8LinearConfig

    kw = {}
    if fmt == "e4m3":
        kw["cast_config_grad_output"] = CastConfig(target_dtype=torch.float8_e4m3fn)
    return Float8LinearConfig(emulate=emulate, **kw)


def _mm_config(config):
    """torchao's per-GEMM settings (output, grad_input, grad_weight), as ``Float8Linear`` builds them."""
    from torchao.float8.float8_linear import LinearMMConfig, ScaledMMConfig

    return LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)
                            for g in (config.gemm_config_output, config.gemm_config_grad_input,
                                      config.gemm_config_grad_weight)))


class _Float8GEMM:
    """Mixin over a megatron parallel linear: ``_forward_impl`` in float8, communication as megatron's."""

    float8_config = None
    float8_mm_config = None

    def _forward_impl(self, input, weight, *args, **kwargs):
        # megatron calls this with keywords only; anything else (frozen weights, deferred wgrad) keeps its path
        if args or not weight.requires_grad or kwargs.get("grad_output_buffer") is not None:
            return super()._forward_impl(input, weight, *args, **kwargs)
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        group = kwargs.get("tp_group") or self.tp_group
        if kwargs.get("sequence_parallel"):
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
        elif kwargs.get("allreduce_dgrad"):
            input = copy_to_tensor_model_parallel_region(input, group=group)
        if torch.is_autocast_enabled(input.device.type):
            input = input.to(torch.get_autocast_dtype(input.device.type))
        out = matmul_with_hp_or_float8_args.apply(input, weight.t(), self.float8_mm_config, self.float8_config)
        bias = kwargs.get("bias")
        return out if bias is None else out + bias.to(out.dtype)


class Float8ColumnParallelLinear(_Float8GEMM, ColumnParallelLinear):
    pass


class Float8RowParallelLinear(_Float8GEMM, RowParallelLinear):
    def _forward_impl(self, input, weight, *args, **kwargs):
        out = super()._forward_impl(input, weight, *args, **kwargs)
        # torchao's matmul returns a view from inside its autograd Function, and megatron's TP all-reduce of a
        # row linear's output (no SP) writes into it in place: eager tolerates that, torch.compile refuses it
        if (self.tp_group is not None and self.tp_group.size() > 1 and not self.sequence_parallel
                and out._is_view()):
            out = out.clone()
        return out


_SWAP = {ColumnParallelLinear: Float8ColumnParallelLinear, RowParallelLinear: Float8RowParallelLinear,
         _CoreRowParallelLinear: Float8RowParallelLinear}


def convert_to_float8(model: torch.nn.Module, fmt: str, emulate: bool = False,
                      device: Optional[torch.device] = None, config=None) -> int:
    """Swap every trainable megatron parallel linear inside a transformer layer of ``model`` whose weight dims
    are multiples of 16 (what FP8 GEMMs need) to its float8 subclass, in place; returns how many. Like TE's
    FP8 (and torchtitan's filter), heads outside the layers stay in high precision: the caption decoder's
    vocabulary projection feeds megatron's vocab-parallel cross entropy, which needs its logits exact-ish and
    writes into them in place.

    ``emulate``: quantise as FP8 but multiply in high precision (CPU, GPUs before sm_89); without it the
    ``device`` must have FP8 GEMMs. ``config``: a torchao ``Float8LinearConfig`` used instead of ``fmt``'s
    (tests pass one with scaling disabled, which makes the GEMMs exact and isolates the communication)."""
    if not torchao_available():
        raise Float8Unavailable("--fp8-format without Transformer Engine needs torchao; pip install torchao "
                                "(or install Transformer Engine and use --transformer-impl te)")
    if not emulate and device is not None and not fp8_gemm_supported(device):
        raise Float8Unavailable(f"--fp8-format needs FP8 GEMMs (CUDA compute capability >= 8.9: H100/H200/L40S), "
                                f"not {device}; drop --fp8-format")
    config = config or float8_config(fmt, emulate)
    mm = _mm_config(config)
    from megatron.core.transformer.transformer_layer import TransformerLayer

    n = 0
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for mod in (sub for layer in layers for sub in layer.modules()):
        new_cls = _SWAP.get(type(mod))
        w = getattr(mod, "weight", None)
        if new_cls is None or w is None or not w.requires_grad or w.shape[0] % 16 or w.shape[1] % 16:
            continue
        mod.__class__ = new_cls
        mod.float8_config, mod.float8_mm_config = config, mm
        n += 1
    return n


def is_float8(module: torch.nn.Module) -> bool:
    return isinstance(module, _Float8GEMM)
