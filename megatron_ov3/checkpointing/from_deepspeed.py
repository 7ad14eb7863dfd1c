"""The universal copy of a checkpoint, made from DeepSpeed's own files on demand (one process, CPU, no DeepSpeed
engine), as DeepSpeed's ``ds_to_universal`` does for Megatron-DeepSpeed.

A save writes DeepSpeed's files and ``universal_index.json`` only (:func:`.universal.write_index`), so resharding
support costs a save nothing. When a run resumes at another layout, or export/evaluation reads the checkpoint,
:func:`ensure_universal` writes ``iter_N/universal`` in exactly the format :func:`.universal.load_universal`
reads (the format ``--save-universal`` wrote at every save before):

* ZeRO-1/2 (fp32 or bf16): every data-parallel rank's optimizer file holds a flat fp32 partition per parameter
  group (``single_partition_of_fp32_groups``), its Adam moments (``base_optimizer_state``) and, per parameter
  name, the slice of the partition it occupies (``param_slice_mappings``); a parameter is the concatenation of
  its slices in data-parallel order.
* ZeRO-0: the model states file holds the module (fp32 masters) or, under bf16, the optimizer's fp32 masters
  (``fp32_groups``), and the torch optimizer state indexed as the index file records.

Tensor-parallel shards are then concatenated along the dimension the index records. Every file is read with
``weights_only=True``. This is the second file to update when DeepSpeed changes its file layout (the first is
:mod:`.deepspeed_io`).
"""
from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from typing import Callable, Dict, List

import torch

from ..errors import MissingFile, UsageError
from . import format as fmt
from .deepspeed_io import ADAM_STATES, safe_torch_load
from .universal import INDEX

Values = Dict[str, Dict[str, torch.Tensor]]  # local name -> {"" (fp32 master) | "exp_avg" | ...: tensor}


def read_index(iter_dir: str) -> dict:
    path = os.path.join(iter_dir, INDEX)
    if not os.path.isfile(path):
        raise MissingFile(f"{iter_dir!r} has neither a universal copy nor {INDEX} (saved by a version before "
                          f"2026-12 with --no-save-universal?); resume it once at its own layout and save again")
    try:
        return json.load(open(path))
    except ValueError as e:
        raise UsageError(f"{path} is damaged ({e}); resume from an earlier iter_* folder") from None


def _zero12_values(iter_dir: str, ranks: List[dict], params: List[dict], steps: List[float]) -> Values:
    frags: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for rec in ranks:  # data-parallel order
        osd = safe_torch_load(os.path.join(iter_dir, rec["zero_file"]), "cpu")["optimizer_state_dict"]
        state = osd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flats = {"": osd["single_partition_of_fp32_groups"][g]}
            if g in state:
                flats.update({k: state[g][k] for k in ADAM_STATES})
                steps.append(float(state[g]["step"]))
            for name, where in mapping.items():
                for k, flat in flats.items():
                    frags[name][k].append(flat.narrow(0, where.start, where.numel))
    out: Values = {}
    for p in params:
        pieces = frags.get(p["name"])
        if not pieces:
            raise UsageError(f"no optimizer file in {iter_dir} holds {p['name']}; the checkpoint is incomplete")
        out[p["name"]] = {k: _reshaped(torch.cat(v), p, iter_dir) for k, v in pieces.items()}
    return out


def _zero0_values(iter_dir: str, ranks: List[dict], params: List[dict], steps: List[float]) -> Values:
    sd = safe_torch_load(os.path.join(iter_dir, ranks[0]["model_file"]), "cpu")
    opt = sd.get("optimizer") or {}
    masters = [t for group in opt["fp32_groups"] for t in group] if "fp32_groups" in opt else None
    state = (opt.get("optimizer_state_dict") or opt).get("state", {})
    out: Values = {}
    for p in params:
        i = p["opt_index"]
        value = masters[i] if masters is not None else sd["module"][p["name"]]
        out[p["name"]] = {"": _reshaped(value.float(), p, iter_dir)}
        if i in state:
            out[p["name"]].update({k: _reshaped(state[i][k], p, iter_dir) for k in ADAM_STATES})
            steps.append(float(state[i]["step"]))
    return out


def _reshaped(t: torch.Tensor, p: dict, iter_dir: str) -> torch.Tensor:
    if t.numel() != int(torch.Size(p["shape"]).numel()):
        raise UsageError(f"{iter_dir}: {p['name']} has {t.numel()} values in DeepSpeed's files but shape "
                         f"{p['shape']} in {INDEX}; the checkpoint is damaged")
    return t.reshape(p["shape"]).float().contiguous()


def _frozen_values(iter_dir: str, ranks: List[dict], params: List[dict]) -> Values:
    """Parameters that do not train (``--freeze-encoder``): their value from the model states, no moments."""
    if not params:
        return {}
    module = safe_torch_load(os.path.join(iter_dir, ranks[0]["model_file"]), "cpu")["module"]
    return {p["name"]: {"": _reshaped(module[p["name"]], p, iter_dir)} for p in params}


def _stage_tensors(iter_dir: str, shards: List[dict], stage: int, zero: int, steps: List[float]) -> dict:
    """``{global name[::state]: full tensor}`` of one pipeline stage, tensor-parallel shards concatenated."""
    per_tp, params = [], None
    for tp in sorted({s["tp"] for s in shards if s["pp"] == stage}):
        ranks = sorted((s for s in shards if s["pp"] == stage and s["tp"] == tp), key=lambda s: s["dp"])
        params = ranks[0]["params"]
        trainable = [p for p in params if p.get("trainable", True)]
        read = _zero12_values if zero in (1, 2) else _zero0_values
        values = read(iter_dir, ranks, trainable, steps)
        values.update(_frozen_values(iter_dir, ranks, [p for p in params if not p.get("trainable", True)]))
        per_tp.append(values)
    tensors = {}
    for p in params:
        for k in per_tp[0][p["name"]]:
            parts = [values[p["name"]][k] for values in per_tp]
            full = parts[0] if p["partition_dim"] is None else torch.cat(parts, dim=p["partition_dim"])
            tensors[p["global"] if not k else f"{p['global']}::{k}"] = full
    return tensors


def to_universal(iter_dir: str, output: str = None, log: Callable[[str], None] = print, verify: bool = True) -> str:
    """Write the universal copy of ``iter_dir`` (default ``iter_dir/universal``; via ``.partial`` + rename, with
    its own manifest), after checking ``iter_dir`` against its manifest (``verify``). Holds one pipeline stage's
    fp32 values and Adam moments in memory at a time. Returns the output folder."""
    from safetensors.torch import save_file

    if verify:
        fmt.check(iter_dir)
    index = read_index(iter_dir)
    meta, shards = index["meta"], index["shards"]
    zero = int(meta.get("zero_stage", 1))
    if zero == 3:
        raise UsageError(f"{iter_dir} was saved with ZeRO-3, which has no universal form here; resume it at its "
                         f"own layout (same TP x PP x DP) or train with --zero-stage 1 or 2")
    if output is not None:  # tools/checkpoint.py to-universal --output: the user's folder, checked first
        if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
            raise UsageError(f"--output {output!r} exists and is not an empty folder; give a new one")
        fmt.check_writable(os.path.dirname(os.path.abspath(output)), "--output")
    output = output or os.path.join(iter_dir, "universal")
    partial = output.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    steps: List[float] = []
    for stage in sorted({s["pp"] for s in shards}):
        save_file(_stage_tensors(iter_dir, shards, stage, zero, steps),
                  os.path.join(partial, f"stage{stage}.safetensors"))
    if steps:
        meta = dict(meta, optimizer_step=int(max(steps)))
    with open(os.path.join(partial, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    fmt.write_manifest(partial, {})
    os.replace(partial, output)
    log(f"wrote the universal copy of {iter_dir} to {output}")
    return output


def _check_made_from(iter_dir: str, uni: str) -> None:
    """A universal copy inside ``iter_N`` must have been made from that checkpoint (its recorded iteration is N):
    anything else (e.g. another tool's weights written there) would be read as the run's trained weights."""
    import json

    tag = os.path.basename(os.path.normpath(iter_dir))
    if not fmt.is_tag(tag):
        return
    try:
        made_at = json.load(open(os.path.join(uni, "meta.json"))).get("iteration")
    except (OSError, ValueError, AttributeError):
        made_at = None
    if made_at != int(tag[len("iter_"):]):
        raise UsageError(f"{uni} records iteration {made_at}, not {tag}'s: it was not made from this checkpoint; "
                         f"move it away (the next reader remakes the copy from DeepSpeed's files)")


def ensure_universal(iter_dir: str, log: Callable[[str], None] = print, verify: bool = True) -> str:
    """``iter_dir/universal`` (checked against its manifest), made first if it is not there yet."""
    uni = os.path.join(iter_dir, "universal")
    if os.path.isfile(os.path.join(uni, "meta.json")):
        fmt.check(uni)
        _check_made_from(iter_dir, uni)
        return uni
    try:
        return to_universal(iter_dir, log=log, verify=verify)
    except PermissionError:
        raise UsageError(f"{iter_dir} has no universal copy yet and is read-only here; make one elsewhere with "
                         f"tools/checkpoint.py to-universal {iter_dir} --output DIR and pass DIR") from None
