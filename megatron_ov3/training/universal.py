"""Layout-independent ("universal") checkpoints: load a run saved at one TP x PP x DP x ZeRO layout into another.

Why not DeepSpeed's checkpoint files or megatron dist_checkpointing alone: DeepSpeed's files are tied to the
TP/PP/DP layout they were written with (ZeRO partitions a flat buffer per rank), and dist_checkpointing covers
the model but not a DeepSpeed ZeRO optimizer. Like DeepSpeed's universal checkpoints, this format stores, for
every parameter under its *global* name (pipeline stages renumbered to global layer indices, tensor-parallel
shards concatenated along megatron's ``partition_dim``), the full fp32 master value and the full Adam states
(``exp_avg``, ``exp_avg_sq``), read and written through DeepSpeed's ``safe_get/set_full_*`` API, which works
for ZeRO-1/2 whatever the data-parallel size. Files are safetensors (no code runs on load):

    DIR/iter_N/universal/stage{P}.safetensors   one per pipeline stage, written by (tp 0, dp 0) of the stage
    DIR/iter_N/universal/meta.json              iteration, consumed samples, optimizer step, layout it came from

megatron's fused QKV and vocab-parallel layouts are contiguous per tensor-parallel rank, so concatenation and
slicing along ``partition_dim`` reshard them exactly. ZeRO-3 is not supported by this path (clear error).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch
import torch.distributed as dist

ADAM_STATES = ("exp_avg", "exp_avg_sq")
_LAYER = re.compile(r"^(.*\.block\.layers\.)(\d+)(\..*)$")


def _layer_offsets(model) -> Dict[str, int]:
    """Local->global layer index shift for every TransformerBlock prefix (non-zero only for pipeline stages)."""
    offsets = {}
    for name, mod in model.named_modules():
        if name.endswith(".block") and hasattr(mod, "layers") and len(mod.layers):
            offsets[name + ".layers."] = mod.layers[0].layer_number - 1
    return offsets


def global_name(name: str, offsets: Dict[str, int]) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    return f"{m.group(1)}{int(m.group(2)) + offsets.get(m.group(1), 0)}{m.group(3)}"


def _unwrap(engine):
    return engine.module if hasattr(engine, "module") else engine


def _torch_optimizer(engine):
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _full_values(engine, param, masters: Dict[int, torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine is None or engine is _unwrap(engine):  # a plain module: weights only
        return {"": param.detach().float()}
    if hasattr(param, "ds_id"):
        raise ValueError("universal checkpoints do not support ZeRO-3; save with --zero-stage 1 or 2")
    out = {"": safe_get_full_fp32_param(param)}
    if out[""] is not None:
        for k in ADAM_STATES:
            out[k] = safe_get_full_optimizer_state(param, k)
        return out
    # ZeRO-0: plain torch optimizer state on the parameter itself, or (bf16) on its fp32 master copy
    master = masters.get(id(param), param)
    state = _torch_optimizer(engine).state.get(master, {})
    out[""] = master.detach().float()
    for k in ADAM_STATES:
        out[k] = state.get(k)
    return out


def _fp32_masters(engine) -> Dict[int, torch.Tensor]:
    """``id(param) -> fp32 master copy`` that DeepSpeed's unfused bf16/fp16 optimizer (ZeRO-0 with --bf16)
    keeps, which is what its torch optimizer updates and holds state for; empty for every other optimizer
    (a parameter is then its own master)."""
    opt = getattr(engine, "optimizer", None)
    low, high = getattr(opt, "fp16_groups", None) or [], getattr(opt, "fp32_groups", None) or []
    return {id(lp): hp for lg, hg in zip(low, high) for lp, hp in zip(lg, hg)}


def _step_tensor(step: float, like: torch.Tensor, group: dict) -> torch.Tensor:
    """AdamW's ``step`` state as torch creates it: on the parameter's device for fused/capturable AdamW (the
    fused CUDA kernel reads it there), on the CPU otherwise."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=like.device if on_device else "cpu")


def _relink_optimizer_states(engine) -> None:
    """DeepSpeed's ZeRO-1/2 optimizer links each parameter to its slice of the Adam state once, after its first
    step; a param group whose state did not exist yet at that moment (seen for the no-weight-decay group) stays
    unlinked and ``safe_get_full_optimizer_state`` fails on it. Re-link now that every state exists."""
    opt = getattr(engine, "optimizer", None)
    if opt is not None and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _ensure_adam_state(engine) -> None:
    """Before the first step the torch AdamW under ZeRO has no state yet; create the (zero) state AdamW would
    create, so the loaded moments have somewhere to go."""
    opt = getattr(engine, "optimizer", None)
    flats = getattr(opt, "single_partition_of_fp32_groups", None)
    if not flats:
        return
    torch_opt = _torch_optimizer(engine)
    groups = {id(p): g for g in torch_opt.param_groups for p in g["params"]}
    for flat in flats:
        st = torch_opt.state[flat]
        if "exp_avg" not in st:
            st["step"] = _step_tensor(0, flat, groups.get(id(flat), {}))
            st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _tp_gather(t: torch.Tensor, param) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return t
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def _tp_slice(t: torch.Tensor, param) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return t
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return t.chunk(tp, dim=param.partition_dim)[r].contiguous()


def _adam_steps(engine) -> Optional[int]:
    """AdamW's own step count on this rank (None for a bare module or before the first step)."""
    if engine is None or engine is _unwrap(engine):
        return None
    steps = [float(st["step"]) for st in _torch_optimizer(engine).state.values() if "step" in st]
    return int(max(steps)) if steps else None


def save_universal(engine, directory: str, meta: dict) -> None:
    """Collective over all ranks: write ``directory/universal``."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    model = _unwrap(engine)
    _relink_optimizer_states(engine)
    offsets = _layer_offsets(model)
    masters = _fp32_masters(engine)
    tensors = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = global_name(name, offsets)
        for k, v in _full_values(engine, p, masters).items():
            if v is None:
                continue
            v = _tp_gather(v.detach().float().cpu(), p)
            tensors[g if not k else f"{g}::{k}"] = v
    out = os.path.join(directory, "universal")
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    if writer:
        os.makedirs(out, exist_ok=True)
        save_file(tensors, os.path.join(out, f"stage{ps.get_pipeline_model_parallel_rank()}.safetensors"))
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        steps = _adam_steps(engine)  # the updates Adam really applied (skipped steps and warm-up steps counted
        if steps is not None:        # as the optimizer counts them), which the bias correction depends on
            meta = dict(meta, optimizer_step=steps)
        full = dict(meta, pipeline_stages=ps.get_pipeline_model_parallel_world_size(),
                    tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                    data_parallel=ps.get_data_parallel_world_size())
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(full, f, indent=1)
    dist.barrier()


def read_meta(directory: str) -> dict:
    """``meta.json`` of a universal checkpoint directory (layout, iteration, model config)."""
    if not os.path.isfile(os.path.join(directory, "meta.json")):
        raise FileNotFoundError(f"{directory!r} is not a universal checkpoint (no meta.json)")
    return json.load(open(os.path.join(directory, "meta.json")))


def read_universal(directory: str) -> tuple:
    """(meta, {key: safetensors handle}) of a universal checkpoint directory (``.../universal``)."""
    from safetensors import safe_open

    meta = read_meta(directory)
    handles = {}
    for s in range(int(meta["pipeline_stages"])):
        path = os.path.join(directory, f"stage{s}.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"universal checkpoint shard {path!r} is missing")
        h = safe_open(path, framework="pt")
        for k in h.keys():
            handles[k] = h
    return meta, handles


def load_universal(engine, directory: str, load_optimizer: bool = True) -> dict:
    """Set every parameter (and Adam state) of this rank's shard from a universal checkpoint. Returns meta.

    ``engine`` may also be the bare model before ``deepspeed.initialize`` (weights only; any ZeRO stage)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    meta, handles = read_universal(directory)
    model = _unwrap(engine)
    offsets = _layer_offsets(model)
    masters = _fp32_masters(engine)
    missing = []
    torch_opt = _torch_optimizer(engine) if load_optimizer else None
    if load_optimizer:
        _ensure_adam_state(engine)
        _relink_optimizer_states(engine)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            raise ValueError("universal checkpoints do not support ZeRO-3; resume with --zero-stage 1 or 2")
        g = global_name(name, offsets)
        if g not in handles:
            missing.append(g)
            continue
        value = _tp_slice(handles[g].get_tensor(g), p)
        if value.shape != p.shape:
            raise ValueError(f"universal checkpoint has {g} of shape {tuple(value.shape)}, this model needs "
                             f"{tuple(p.shape)} (different model size?)")
        master = masters.get(id(p), p)
        with torch.no_grad():
            p.data.copy_(value.to(p.dtype))
            if master is not p:  # ZeRO-0 + bf16: the fp32 master is what the next step starts from
                master.data.copy_(value.to(master.device, master.dtype))
        hp = hasattr(p, "_hp_mapping")
        if hp:
            safe_set_full_fp32_param(p, value.to(p.device))
        if not load_optimizer:
            continue
        for k in ADAM_STATES:
            key = f"{g}::{k}"
            if key not in handles:
                continue
            s = _tp_slice(handles[key].get_tensor(key), p).to(p.device)
            if hp:
                safe_set_full_optimizer_state(p, s, k)
            else:
                torch_opt.state.setdefault(master, {})[k] = s.clone()
    if missing and meta.get("partial"):
        if dist.is_initialized() and dist.get_rank() == 0:
            print(f"universal checkpoint is partial ({meta.get('source', '')}): {len(missing)} parameters keep "
                  f"their initialisation (e.g. {missing[:2]})", flush=True)
    elif missing:
        raise ValueError(f"universal checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]} "
                         f"(different model size or options?)")
    if load_optimizer and "optimizer_step" in meta:
        for group in torch_opt.param_groups:
            for q in group["params"]:
                if q in torch_opt.state:
                    torch_opt.state[q]["step"] = _step_tensor(meta["optimizer_step"], q, group)
    return meta
