"""``torch.compile`` of each transformer layer, in place (torchtitan's per-block compile).

Each megatron-core ``TransformerLayer`` is compiled on its own with ``nn.Module.compile()``: the module keeps
its class, parameters and state-dict keys (no ``_orig_mod.`` prefix), so checkpoints, ZeRO, the SP gradient
hooks and export are unaffected. Layers of one tower share code and shapes, so dynamo compiles one graph per
tower and reuses it for every layer. Compiling per layer rather than the whole ``TransformerBlock`` keeps
megatron's recomputation and pipeline logic outside the compiled graphs; a measurement on an H100 found
compiling the whole block slower than eager (``../shared/notes/cpu-and-gpu-facts.md``) - whether per-layer
compile helps is for ``tools/benchmark.py --torch-compile`` to say on the target GPU.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


def compile_layers(model: torch.nn.Module, backend: str = "inductor", mode=None) -> int:
    """Compile every ``TransformerLayer`` of ``model`` in place; returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, TransformerLayer):
            mod.compile(backend=backend, mode=mode)
            n += 1
    return n
