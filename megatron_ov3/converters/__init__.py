"""Model converters: what is applied *around* a built OV3 model, never threaded through its definition
(torchtitan's model-converter idea). The model is built from megatron-core specs; then, per
:class:`~megatron_ov3.models.config.LayerImplConfig`:

* ``float8``: torchao float8 GEMMs in megatron's parallel linears, the FP8 path of the local backend
  (with the ``te`` backend FP8 is Transformer Engine's, set inside the layers by megatron-core);
* ``compile``: ``torch.compile`` of each transformer layer, in place;
* ``tf32``: TF32 tensor cores for fp32 matmuls/convolutions on a GPU (process-wide, as open_clip sets it).

Sequence-parallel gradient hooks (:mod:`megatron_ov3.parallel.sequence_parallel`) and DeepSpeed ZeRO wrap the
result the same way.
"""
from __future__ import annotations

from typing import List

import torch

from ..models.specs import resolve_backend
from .compile import compile_layers
from .float8 import Float8Unavailable, convert_to_float8, fp8_gemm_supported, is_float8, torchao_available


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions, process-wide (``LayerImplConfig.tf32``); a no-op without CUDA."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def apply_converters(model: torch.nn.Module, impl, device: torch.device) -> List[str]:
    """Apply the converters ``impl`` asks for to ``model`` (already on ``device``), in place; returns one
    line per converter applied, for the log. FP8 on a CPU is emulated (FP8 quantisation, fp32 GEMMs)."""
    done = []
    set_tf32(impl.tf32)
    if impl.tf32 and device.type == "cuda":
        done.append("tf32: fp32 matmuls and convolutions on TF32 tensor cores (--no-tf32: full fp32)")
    if impl.fp8_format and resolve_backend(impl.transformer_impl) == "local":
        emulate = device.type == "cpu"
        n = convert_to_float8(model, impl.fp8_format, emulate=emulate, device=device)
        done.append(f"fp8-{impl.fp8_format} (torchao float8{', emulated on CPU' if emulate else ''}): {n} linears")
    if impl.torch_compile:
        done.append(f"torch.compile: {compile_layers(model)} transformer layers")
    return done


__all__ = ["apply_converters", "set_tf32", "convert_to_float8", "compile_layers", "is_float8", "torchao_available",
           "fp8_gemm_supported", "Float8Unavailable"]
