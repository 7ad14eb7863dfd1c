"""Build megatron-core ``TransformerBlock``s for OV3 towers from a :class:`TowerConfig` and a layer spec."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import ConfigError, LayerImplConfig, TowerConfig
from .specs import layer_spec, resolve_backend


def _parallel_sizes():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron-core parallel state is not initialized; call "
            "megatron_ov3.parallel.initialize_model_parallel() (or the training entry point) first"
        )
    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def transformer_config(
    tower: TowerConfig, impl: LayerImplConfig, *, eps: float, name: str, split_across_pipeline: bool = False,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """The megatron-core TransformerConfig of one tower. Only the image encoder is split across pipeline
    stages (``split_across_pipeline``); every other tower lives whole on one stage. ``sequence_parallel``: the
    tower takes part in ``impl.sequence_parallel`` (the image-token stacks do; the text towers do not)."""
    tp, pp = _parallel_sizes()
    if tower.heads % tp:
        raise ConfigError(
            f"{name}.heads={tower.heads} is not divisible by --tensor-model-parallel-size {tp}; "
            f"use a tensor-parallel size that divides {tower.heads}"
        )
    if tower.mlp % tp:
        raise ConfigError(f"{name}.mlp={tower.mlp} is not divisible by --tensor-model-parallel-size {tp}")
    pp_tower = pp if split_across_pipeline else 1
    if tower.depth % pp_tower:
        raise ConfigError(
            f"{name}.depth={tower.depth} is not divisible by --pipeline-model-parallel-size {pp}; "
            f"use a pipeline size that divides {tower.depth}"
        )
    backend = resolve_backend(impl.transformer_impl)
    if impl.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=tower.depth,
        hidden_size=tower.width,
        ffn_hidden_size=tower.mlp,
        num_attention_heads=tower.heads,
        kv_channels=tower.head_dim,
        layernorm_epsilon=eps,
        activation_func=F.gelu,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        init_method_std=impl.init_method_std,
        params_dtype=impl.params_dtype,
        pipeline_dtype=impl.params_dtype,
        bf16=impl.bf16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp_tower,
        sequence_parallel=impl.sequence_parallel and sequence_parallel,
        use_cpu_initialization=on_cpu,
    )
    if impl.recompute_granularity is not None:
        kwargs["recompute_granularity"] = impl.recompute_granularity
        if impl.recompute_granularity == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=impl.recompute_num_layers)
    if impl.fp8_format and backend == "te":  # local backend: torchao float8, applied around the model (converters)
        kwargs.update(fp8=impl.fp8_format, fp8_recipe="delayed")
    return TransformerConfig(**kwargs)


def build_block(
    tower: TowerConfig,
    impl: LayerImplConfig,
    *,
    causal: bool,
    eps: float,
    name: str,
    split_across_pipeline: bool = False,
    sequence_parallel: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
) -> TransformerBlock:
    """A megatron-core TransformerBlock (no final norm: each tower owns its own) for one tower."""
    config = transformer_config(tower, impl, eps=eps, name=name, split_across_pipeline=split_across_pipeline,
                                sequence_parallel=sequence_parallel)
    block = TransformerBlock(
        config=config,
        spec=layer_spec(impl.transformer_impl, causal=causal, attention=impl.attention_backend),
        post_layer_norm=False,
        pre_process=pre_process,
        post_process=post_process,
    )
    return block


def scatter_sequence(block: TransformerBlock, x_sbh: torch.Tensor) -> torch.Tensor:
    """Enter a sequence-parallel block: keep this TP rank's contiguous share of the sequence (dim 0) of a
    replicated ``[s, b, h]`` tensor (backward: all-gather). Identity without sequence parallelism."""
    if not block.config.sequence_parallel:
        return x_sbh
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

    tp = block.config.tensor_model_parallel_size
    if x_sbh.shape[0] % tp:
        raise ValueError(f"sequence parallelism needs the token count ({x_sbh.shape[0]}) divisible by "
                         f"--tensor-model-parallel-size {tp}; change --register-tokens or the image size, or "
                         f"drop --sequence-parallel")
    return scatter_to_sequence_parallel_region(x_sbh)


def gather_sequence(block: TransformerBlock, x_sbh: torch.Tensor) -> torch.Tensor:
    """Leave a sequence-parallel block: all-gather the sequence for the replicated computation that follows
    (backward: each rank keeps its share of the, identical, full gradient). Identity otherwise."""
    if not block.config.sequence_parallel:
        return x_sbh
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x_sbh, tensor_parallel_output_grad=False)


@contextlib.contextmanager
def capture_layer_outputs(block: TransformerBlock, enabled: bool = True):
    """Collect the output hidden state ([s, b, h], whole sequence) of every layer of ``block`` while the context
    is open."""
    outputs: List[torch.Tensor] = []
    handles = []
    if enabled:
        def hook(_module, _inputs, out):
            outputs.append(gather_sequence(block, out[0] if isinstance(out, tuple) else out))

        handles = [layer.register_forward_hook(hook) for layer in block.layers]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def run_block(block: TransformerBlock, x_bsh: torch.Tensor, hidden_states: Optional[list] = None) -> torch.Tensor:
    """Run a block on batch-first activations ``[b, s, h]`` (megatron works in ``[s, b, h]``), sharding the
    sequence over the tensor-parallel group inside the block when it is sequence-parallel."""
    x = scatter_sequence(block, x_bsh.transpose(0, 1).contiguous())
    with capture_layer_outputs(block, enabled=hidden_states is not None) as outs:
        y = block(x, attention_mask=None)
    if hidden_states is not None:
        hidden_states.extend(o.transpose(0, 1) for o in outs)
    return gather_sequence(block, y).transpose(0, 1)
