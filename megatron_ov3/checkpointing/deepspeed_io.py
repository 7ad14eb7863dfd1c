"""Everything that touches DeepSpeed's engine, optimizer wrappers and their private attributes, in one file.

* the engine's own checkpoint files (``save_checkpoint``/``load_checkpoint``) inside our atomic publish;
* every rank's RNG states (plain tensor dicts, ``weights_only=True`` on load);
* access to full fp32 masters and Adam moments of ZeRO-0/1/2 optimizers for the universal copy, including the
  workarounds that reach into DeepSpeed's private attributes (``fp16_groups``/``fp32_groups``,
  ``single_partition_of_fp32_groups``, ``_hp_optimizer_states_linked``). When DeepSpeed changes, this is the
  file to update.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..errors import MissingFile, UsageError
from . import format as fmt

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, s in get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = s
    return state


def set_rng_state(state: dict) -> bool:
    """Restore what :func:`rng_state` saved. A checkpoint written on another kind of device (a CPU run resumed on a
    GPU: megatron's tracker then holds CPU generator states, 5056 bytes, which ``torch.cuda.set_rng_state``
    rejects; or the reverse) keeps this run's own seeded tracker and device generator. Returns whether every
    saved generator was restored."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    exact = True
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    elif torch.cuda.is_available() or "cuda" in state:
        exact = False
    tracker = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    current = get_cuda_rng_tracker().get_states()
    if tracker and all(k in current and current[k].shape == v.shape for k, v in tracker.items()):
        get_cuda_rng_tracker().set_states(tracker)
    elif tracker:
        exact = False
    return exact


def save(engine, directory: str, iteration: int, client_state: dict, json_files: Dict[str, dict],
         keep_last: Optional[int] = None, extra=None, rng: Optional[dict] = None, timeout_s: float = 1800.0) -> str:
    """Collective: DeepSpeed's files, every rank's RNG, ``extra(partial_dir)`` (the universal index) and the
    ``json_files`` (rank 0; e.g. the resolved job configuration) into ``iter_N.partial``; then each rank seals
    (checksums and fsyncs) what it wrote and rank 0 writes the manifest and publishes atomically, both in the
    background (:class:`format.Publisher`; :func:`format.wait_for_publish` waits for it)."""
    fmt.wait_for_publish()  # the previous save is complete before this one starts
    tag = fmt.tag_for(iteration)
    partial = tag + ".partial"
    folder = os.path.join(directory, partial)
    rank = dist.get_rank()
    if rank == 0:
        fmt.start_partial(directory, partial)
    dist.barrier()
    engine.save_checkpoint(directory, tag=partial, client_state=client_state, save_latest=False)
    torch.save(rng_state() if rng is None else rng, os.path.join(folder, f"rng_rank{rank}.pt"))
    if extra is not None:
        extra(folder)
    if rank == 0:
        for name, content in json_files.items():
            with open(os.path.join(folder, name), "w") as f:
                json.dump(content, f, indent=1, default=str)
    names = file_names(engine)
    mine = [f"rng_rank{rank}.pt", names["zero_file"]] + ([names["model_file"]] if engine.save_non_zero_checkpoint
                                                          else [])
    fmt.PUBLISHER.start(directory, partial, tag, [n for n in mine if n], rank, dist.get_world_size(), keep_last,
                        timeout_s)
    return tag


def deepspeed_safe_globals() -> list:
    """The only non-tensor, non-container objects DeepSpeed's own checkpoint files hold (found by loading ZeRO
    0/1/2/3, fp32 and bf16 checkpoints with ``weights_only=True``): plain state objects, no callables."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location=None):
    """``torch.load(weights_only=True)`` with DeepSpeed's few state classes allowed: a file that names any other
    global (e.g. a planted ``os.system``) is refused before anything in it runs; a damaged file is named."""
    import pickle
    import zipfile

    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
        raise UsageError(f"refusing to load {path}: it holds more than tensors and DeepSpeed's state "
                         f"({reason[:160]}); loading it would run code from the file. Use checkpoints you wrote "
                         f"yourself") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError) as e:
        raise UsageError(f"checkpoint file {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"resume from an earlier iter_* folder (edit 'latest') or re-save it") from None


class _WeightsOnlyLoads:
    """Within ``with``, the engine's checkpoint engine (through which DeepSpeed reads every model and ZeRO
    optimizer file, with ``torch.load(weights_only=False)``) reads with :func:`safe_torch_load` instead."""

    def __init__(self, engine):
        self.ce = getattr(engine, "checkpoint_engine", None)

    def __enter__(self):
        if self.ce is not None:
            self.original = self.ce.load
            self.ce.load = lambda path, map_location=None: safe_torch_load(path, map_location)
        return self

    def __exit__(self, *exc):
        if self.ce is not None:
            self.ce.load = self.original
        return False


def load(engine, directory: str, module_only: bool = False, load_optimizer: bool = True,
         load_scheduler: Optional[bool] = None):
    """Load ``latest`` from ``directory`` into the engine; returns (tag, client_state, rng dict or None).
    ``load_scheduler`` (default: unless ``module_only``) restores the learning-rate schedule's position."""
    if not os.path.isdir(directory):
        raise MissingFile(f"checkpoint directory {directory!r} does not exist")
    tag = fmt.read_latest(directory)
    if tag is None:
        raise MissingFile(f"{directory!r} has no '{fmt.LATEST}' file; is it a megatron_ov3 checkpoint directory?")
    with _WeightsOnlyLoads(engine):  # DeepSpeed's loader would unpickle arbitrary objects
        path, client = engine.load_checkpoint(
            directory, tag=tag, load_module_only=module_only,
            load_optimizer_states=load_optimizer and not module_only,
            load_lr_scheduler_states=(not module_only) if load_scheduler is None else load_scheduler,
        )
    if path is None:
        raise UsageError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)!r}")
    rng_file = os.path.join(directory, tag, f"rng_rank{dist.get_rank()}.pt")
    rng = safe_torch_load(rng_file, map_location="cpu") if os.path.isfile(rng_file) else None
    return tag, client or {}, rng


def unwrap(engine):
    return engine.module if hasattr(engine, "module") else engine


def torch_optimizer(engine):
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def full_values(engine, param, masters: Dict[int, torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine is None or engine is unwrap(engine):  # a plain module: weights only
        return {"": param.detach().float()}
    if hasattr(param, "ds_id"):
        raise UsageError("universal checkpoints do not support ZeRO-3; save with --zero-stage 1 or 2")
    out = {"": safe_get_full_fp32_param(param)}
    if out[""] is not None:
        for k in ADAM_STATES:
            out[k] = safe_get_full_optimizer_state(param, k)
        return out
    # ZeRO-0: plain torch optimizer state on the parameter itself, or (bf16) on its fp32 master copy
    master = masters.get(id(param), param)
    state = torch_optimizer(engine).state.get(master, {})
    out[""] = master.detach().float()
    for k in ADAM_STATES:
        out[k] = state.get(k)
    return out


def fp32_masters(engine) -> Dict[int, torch.Tensor]:
    """``id(param) -> fp32 master copy`` that DeepSpeed's unfused bf16/fp16 optimizer (ZeRO-0 with --bf16)
    keeps, which is what its torch optimizer updates and holds state for; empty for every other optimizer
    (a parameter is then its own master)."""
    opt = getattr(engine, "optimizer", None)
    low, high = getattr(opt, "fp16_groups", None) or [], getattr(opt, "fp32_groups", None) or []
    return {id(lp): hp for lg, hg in zip(low, high) for lp, hp in zip(lg, hg)}


def step_tensor(step: float, like: torch.Tensor, group: dict) -> torch.Tensor:
    """AdamW's ``step`` state as torch creates it: on the parameter's device for fused/capturable AdamW (the
    fused CUDA kernel reads it there), on the CPU otherwise."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=like.device if on_device else "cpu")


def relink_optimizer_states(engine) -> None:
    """DeepSpeed's ZeRO-1/2 optimizer links each parameter to its slice of the Adam state once, after its first
    step; a param group whose state did not exist yet at that moment (seen for the no-weight-decay group) stays
    unlinked and ``safe_get_full_optimizer_state`` fails on it. Re-link now that every state exists."""
    opt = getattr(engine, "optimizer", None)
    if opt is not None and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def ensure_adam_state(engine) -> None:
    """Before the first step the torch AdamW under ZeRO has no state yet; create the (zero) state AdamW would
    create, so the loaded moments have somewhere to go."""
    opt = getattr(engine, "optimizer", None)
    flats = getattr(opt, "single_partition_of_fp32_groups", None)
    if not flats:
        return
    torch_opt = torch_optimizer(engine)
    groups = {id(p): g for g in torch_opt.param_groups for p in g["params"]}
    for flat in flats:
        st = torch_opt.state[flat]
        if "exp_avg" not in st:
            st["step"] = step_tensor(0, flat, groups.get(id(flat), {}))
            st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def adam_steps(engine) -> Optional[int]:
    """AdamW's own step count on this rank (None for a bare module or before the first step)."""
    if engine is None or engine is unwrap(engine):
        return None
    steps = [float(st["step"]) for st in torch_optimizer(engine).state.values() if "step" in st]
    return int(max(steps)) if steps else None


def file_names(engine) -> dict:
    """The names DeepSpeed gives this rank's files in a checkpoint folder: the model states (written by the first
    data-parallel rank of each model-parallel rank) and, under ZeRO-1/2, this rank's optimizer partition."""
    names = {"model_file": os.path.basename(engine._get_ckpt_name("", "tag")), "zero_file": None}
    if engine.zero_optimization_stage() in (1, 2):
        names["zero_file"] = os.path.basename(engine._get_zero_ckpt_name("", "tag"))
    return names


def optimizer_positions(engine) -> Dict[int, int]:
    """``id(param) -> index`` of its state in the torch optimizer's ``state_dict()`` under ZeRO-0 (for the
    unfused bf16 optimizer: the index of its fp32 master, in ``fp16_groups`` order); empty under ZeRO-1/2,
    whose files name every parameter's slice themselves (``param_slice_mappings``)."""
    if engine.zero_optimization_stage() != 0:
        return {}
    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None) or [g["params"] for g in torch_optimizer(engine).param_groups]
    flat = [p for g in groups for p in g]
    return {id(p): i for i, p in enumerate(flat)}
