"""Gradient reduction for sequence-parallel parameters, applied around the model (not inside it).

Under megatron sequence parallelism each tensor-parallel rank runs the LayerNorms (and the row-parallel
linear biases) of a sequence-parallel block on its own share of the tokens, so the gradient of such a
parameter on one rank is a partial sum over that share. megatron-core's own DDP all-reduces them over the
tensor-parallel group in ``finalize_model_grads``; here the optimizer is DeepSpeed's, which knows nothing of
it, so every parameter marked ``sequence_parallel`` gets a gradient hook that all-reduces its gradient over the
tensor-parallel group when autograd produces it - before it is accumulated into ``.grad`` and before any of
DeepSpeed's reduction hooks (which run after accumulation) can see it. The TP ranks of a group run the same
graph in the same order, so the collectives line up.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def sequence_parallel_parameters(model: torch.nn.Module):
    return [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]


def install_grad_hooks(model: torch.nn.Module) -> int:
    """Register the TP all-reduce hook on every sequence-parallel parameter of ``model``; returns how many."""
    from megatron.core import parallel_state as ps

    params = sequence_parallel_parameters(model)
    if not params or ps.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = ps.get_tensor_model_parallel_group()

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in params:
        p.register_hook(hook)
    return len(params)
