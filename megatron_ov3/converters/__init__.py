"""Model converters: what is applied *around* a built OV3 model, never threaded through its definition
(torchtitan's model-converter idea). The model is built from megatron-core specs; then, per
:class:`~megatron_ov3.models.config.LayerImplConfig`:

* ``float8``: torchao float8 GEMMs in megatron's parallel linears, the FP8 path of the local backend
  (with the ``te`` backend FP8 is Transformer Engine's, set inside the layers by megatron-core);
* ``compile``: ``torch.compile`` of each transformer layer, in place.

Sequence-parallel gradient hooks (:mod:`megatron_ov3.parallel.sequence_parallel`) and DeepSpeed ZeRO wrap the
result the same way.
"""
from __future__ import annotations

from typing import List

import torch

from ..models.specs import resolve_backend
from .compile import compile_layers
from .float8 import Float8Unavailable, convert_to_float8, fp8_gemm_supported, is_float8, torchao_available


def apply_converters(model: torch.nn.Module, impl, device: torch.device) -> List[str]:
    """Apply the converters ``impl`` asks for to ``model`` (already on ``device``), in place; returns one
    line per converter applied, for the log. FP8 on a CPU is emulated (FP8 quantisation, fp32 GEMMs)."""
    done = []
    if impl.fp8_format and resolve_backend(impl.transformer_impl) == "local":
        emulate = device.type == "cpu"
        n = convert_to_float8(model, impl.fp8_format, emulate=emulate, device=device)
        done.append(f"fp8-{impl.fp8_format} (torchao float8{', emulated on CPU' if emulate else ''}): {n} linears")
    if impl.torch_compile:
        done.append(f"torch.compile: {compile_layers(model)} transformer layers")
    return done


__all__ = ["apply_converters", "convert_to_float8", "compile_layers", "is_float8", "torchao_available",
           "fp8_gemm_supported", "Float8Unavailable"]
