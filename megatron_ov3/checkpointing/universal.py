"""Layout-independent ("universal") checkpoints: load a run saved at one TP x PP x DP x ZeRO layout into another.

A training save writes only DeepSpeed's own files plus ``universal_index.json`` (:func:`write_index`: which file
holds which parameter's slice, under which global name); the universal copy below is produced from them on demand
(:mod:`.from_deepspeed`) when a run resumes at another layout, an export or evaluation reads the checkpoint, or
``tools/checkpoint.py to-universal`` asks. ``--save-universal`` makes one at every save instead.

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
from typing import Dict

import torch
import torch.distributed as dist
from ..errors import MissingFile, UsageError
from . import deepspeed_io
from .deepspeed_io import (ADAM_STATES, adam_steps, ensure_adam_state, fp32_masters, full_values,
                           relink_optimizer_states, step_tensor, torch_optimizer, unwrap)

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


def _tp_gather(t: torch.Tensor, param) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return t
    group = ps.get_tensor_model_parallel_group()
    # on the parameter's device: NCCL gathers only CUDA tensors (a checkpoint's tensors are read onto the CPU)
    local = t.to(param.device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=param.partition_dim).to(t.device)


def _tp_slice(t: torch.Tensor, param) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return t
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return t.chunk(tp, dim=param.partition_dim)[r].contiguous()


INDEX = "universal_index.json"


def _shard_record(engine) -> dict:
    """What this rank's DeepSpeed files hold: its coordinates, its file names and (first data-parallel rank
    only; the others hold the same parameters) every parameter's local and global name, shape, tensor-parallel
    dimension, optimizer-state index and whether it trains (frozen ones are read from the model states)."""
    from megatron.core import parallel_state as ps

    rec = {"pp": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank(),
           "dp": ps.get_data_parallel_rank(), **deepspeed_io.file_names(engine)}
    if rec["dp"] != 0:
        return rec
    model = unwrap(engine)
    offsets, positions = _layer_offsets(model), deepspeed_io.optimizer_positions(engine)
    tp = ps.get_tensor_model_parallel_world_size()
    rec["params"] = [
        {"name": name, "global": global_name(name, offsets), "shape": list(p.shape), "opt_index": positions.get(id(p)),
         "partition_dim": p.partition_dim if tp > 1 and getattr(p, "tensor_model_parallel", False) else None,
         "trainable": p.requires_grad}
        for name, p in model.named_parameters()]
    return rec


def write_index(engine, directory: str, meta: dict) -> None:
    """Collective: every rank's :func:`_shard_record` gathered to rank 0, written with ``meta`` (iteration,
    schedule, model config, layout) as ``directory/universal_index.json``. Small (names and shapes), so a
    save stays DeepSpeed's own save; the tensors are only read when a universal copy is made."""
    records = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_shard_record(engine), records, dst=0)
    if dist.get_rank() == 0:
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump({"format": 1, "meta": meta, "shards": records}, f)


def save_universal(engine, directory: str, meta: dict) -> None:
    """Collective over all ranks: write ``directory/universal``."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    model = unwrap(engine)
    relink_optimizer_states(engine)
    offsets = _layer_offsets(model)
    masters = fp32_masters(engine)
    tensors = {}
    for name, p in model.named_parameters():
        g = global_name(name, offsets)
        if not p.requires_grad:  # frozen (e.g. --freeze-encoder): its value, no optimizer state
            tensors[g] = _tp_gather(p.detach().float().cpu(), p)
            continue
        for k, v in full_values(engine, p, masters).items():
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
        steps = adam_steps(engine)  # the updates Adam really applied (skipped steps and warm-up steps counted
        if steps is not None:        # as the optimizer counts them), which the bias correction depends on
            meta = dict(meta, optimizer_step=steps)
        full = dict(meta, pipeline_stages=ps.get_pipeline_model_parallel_world_size(),
                    tensor_parallel=ps.get_tensor_model_parallel_world_size(),
                    data_parallel=ps.get_data_parallel_world_size())
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(full, f, indent=1)
    dist.barrier()
    if dist.get_rank() == 0:
        from . import format as fmt

        fmt.write_manifest(out, {})
    dist.barrier()


def read_meta(directory: str) -> dict:
    """``meta.json`` of a universal checkpoint directory (layout, iteration, model config)."""
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        raise MissingFile(f"{directory!r} is not a universal checkpoint (no meta.json)")
    try:
        return json.load(open(path))
    except ValueError as e:
        raise UsageError(f"{path} is damaged ({e}); make the universal copy again (tools/checkpoint.py "
                         f"to-universal) or use an earlier checkpoint") from None


def read_universal(directory: str) -> tuple:
    """(meta, {key: safetensors handle}) of a universal checkpoint directory (``.../universal``)."""
    from safetensors import safe_open

    meta = read_meta(directory)
    handles = {}
    for s in range(int(meta["pipeline_stages"])):
        path = os.path.join(directory, f"stage{s}.safetensors")
        if not os.path.isfile(path):
            raise MissingFile(f"universal checkpoint shard {path!r} is missing")
        try:
            h = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own SafetensorError (header or size damage)
            raise UsageError(f"universal checkpoint file {path} is damaged ({str(e).splitlines()[0][:120]}); make it "
                             f"again (tools/checkpoint.py to-universal) or use an earlier checkpoint") from None
        for k in h.keys():
            handles[k] = h
    return meta, handles


def load_universal(engine, directory: str, load_optimizer: bool = True) -> dict:
    """Set every parameter (and Adam state) of this rank's shard from a universal checkpoint. Returns meta.

    ``engine`` may also be the bare model before ``deepspeed.initialize`` (weights only; any ZeRO stage)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    meta, handles = read_universal(directory)
    model = unwrap(engine)
    offsets = _layer_offsets(model)
    masters = fp32_masters(engine)
    missing = []
    torch_opt = torch_optimizer(engine) if load_optimizer else None
    if load_optimizer:
        ensure_adam_state(engine)
        relink_optimizer_states(engine)
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            raise UsageError("universal checkpoints do not support ZeRO-3; resume with --zero-stage 1 or 2")
        g = global_name(name, offsets)
        if g not in handles:
            missing.append(g)
            continue
        value = _tp_slice(handles[g].get_tensor(g), p)
        if value.shape != p.shape:
            raise UsageError(f"universal checkpoint has {g} of shape {tuple(value.shape)}, this model needs "
                             f"{tuple(p.shape)} (different model size?)")
        if not p.requires_grad:  # frozen: the value only (it is in no optimizer)
            with torch.no_grad():
                p.data.copy_(value.to(p.dtype))
            continue
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
        raise UsageError(f"universal checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]} "
                         f"(different model size or options?)")
    if load_optimizer and "optimizer_step" in meta:
        for group in torch_opt.param_groups:
            for q in group["params"]:
                if q in torch_opt.state:
                    torch_opt.state[q]["step"] = step_tensor(meta["optimizer_step"], q, group)
    return meta


def universal_folder(path: str) -> str:
    """``path``, or its ``universal`` subfolder when ``path`` only holds one (what ``tools/init_checkpoint.py
    --output`` was given): every tool that reads a universal checkpoint takes either folder."""
    inner = os.path.join(path, "universal")
    if not os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(inner, "meta.json")):
        return inner
    return path
