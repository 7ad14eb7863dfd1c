"""megatron-core ``ModuleSpec``s for every transformer stack of OV3.

Two families, chosen once per model build (never per call):

* ``local``: megatron-core modules only (``ColumnParallelLinear``/``RowParallelLinear``, torch LayerNorm or
  apex's fused one when installed). Core attention is :class:`SDPAttention`, which calls
  ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU) instead of megatron's unfused
  softmax attention (``attention="unfused"`` keeps megatron's ``DotProductAttention``). Runs on CPU.
* ``te``: Transformer Engine layers (LayerNorm fused into the QKV and FC1 GEMMs, TE fused attention), which
  also carry FP8. Selected by ``backend="auto"`` only when ``transformer_engine`` imports; asking for ``te``
  without it is a clear error, never a crash inside megatron.

Attention masks: the image encoder, the reconstruction decoder and the text encoder are bidirectional
(``AttnMaskType.no_mask``); the caption decoder is causal (``AttnMaskType.causal``), so no mask tensor is ever
materialised and every backend can use its causal kernel.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel import RowParallelLinear as _CoreRowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import divide

from .config import ATTENTIONS, BACKENDS  # defined with the configs, which import no megatron-core


def te_available() -> bool:
    """True when Transformer Engine imports (checked without importing megatron's TE extension)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install (e.g. no CUDA) counts as absent
        return False
    return True


def apex_available() -> bool:
    """True when NVIDIA apex's fused LayerNorm imports (PyPI's unrelated `apex` package does not count)."""
    try:
        from apex.normalization import FusedLayerNorm  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """Map ``auto`` to ``te`` when Transformer Engine is importable, else ``local``; validate the name."""
    if backend not in BACKENDS:
        raise ValueError(f"transformer backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "te" if te_available() else "local"
    if backend == "te" and not te_available():
        raise ValueError(
            "transformer backend 'te' needs Transformer Engine, which does not import here; "
            "install it (pip install -e .[te] on a CUDA machine) or use --transformer-impl local"
        )
    return backend


class RowParallelLinear(_CoreRowParallelLinear):
    """megatron-core's ``RowParallelLinear`` that hands its own TP group to its GEMM. Core's ``forward`` passes
    ``tp_group=None`` to ``_forward_impl`` (megatron-core 0.16), which then looks the group up and, on global rank 0
    only, calls ``warnings.warn`` at every forward: ``torch.compile`` cannot trace that call, so every compiled
    layer broke into several graphs on rank 0 alone (19 graphs instead of 3 for the tiny model,
    ``tests/unit/test_converters.py``), and every rank waited for rank 0's extra graph launches."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


class SDPAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Drop-in replacement for megatron-core's ``DotProductAttention`` (same constructor and forward
    signature, tensors in megatron's ``[s, b, heads/tp, head_dim]`` layout). On GPU, PyTorch dispatches to
    flash or memory-efficient attention; no ``[b, h, s, s]`` score tensor is kept for backward.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the 'te' backend")
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size

        tp = pg_collection.tp.size() if pg_collection is not None else get_tensor_model_parallel_world_size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("packed sequences need the 'te' backend")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        rep = self.heads_per_partition // self.groups_per_partition
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask  # megatron masks are True where attention is NOT allowed
        if attention_bias is not None:
            mask = attention_bias if mask is None else attention_bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal, scale=self.softmax_scale,
        )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with megatron's norm constructor. Unlike megatron's ``WrappedTorchNorm`` it supports
    sequence parallelism: its parameters carry ``sequence_parallel`` so their gradients, partial sums over this
    rank's share of the sequence, are all-reduced over the tensor-parallel group
    (:func:`megatron_ov3.parallel.sequence_parallel.install_grad_hooks`), as megatron's fused norms are."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)


def _local_norm():
    if apex_available():
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return FusedLayerNorm
    return LayerNorm


def _layer(mask: AttnMaskType, norm, qkv, core, proj, fc1, fc2) -> ModuleSpec:
    """Pre-LN TransformerLayer spec from its parts (``norm`` IdentityOp when fused into qkv/fc1)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv, core_attention=core, linear_proj=proj, q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def local_layer_spec(attn_mask_type: AttnMaskType, attention: str = "sdpa") -> ModuleSpec:
    """Pre-LN transformer layer from megatron-core modules only (runs on CPU)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r} is unknown; use one of {', '.join(ATTENTIONS)}")
    core = SDPAttention if attention == "sdpa" else DotProductAttention
    return _layer(attn_mask_type, _local_norm(), ColumnParallelLinear, core, RowParallelLinear,
                  ColumnParallelLinear, RowParallelLinear)


def te_layer_spec(attn_mask_type: AttnMaskType) -> ModuleSpec:
    """Transformer Engine layer: LayerNorm fused into QKV/FC1, TE fused attention, FP8-capable GEMMs."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return _layer(attn_mask_type, IdentityOp, TELayerNormColumnParallelLinear, TEDotProductAttention,
                  TERowParallelLinear, TELayerNormColumnParallelLinear, TERowParallelLinear)


def layer_spec(backend: str, causal: bool, attention: str = "sdpa") -> ModuleSpec:
    """The layer spec for one stack: ``backend`` in {auto, local, te}; ``causal`` for the caption decoder."""
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if resolve_backend(backend) == "te":
        return te_layer_spec(mask)
    return local_layer_spec(mask, attention)

