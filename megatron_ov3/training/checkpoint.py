"""Checkpoints: DeepSpeed engine state + trainer state, made visible atomically.

Layout of ``--save DIR``::

    DIR/iter_0000100/      DeepSpeed files (model, ZeRO optimizer shards, scheduler) + trainer state
                           (client state: iteration, consumed samples, data position of every DP rank)
                           + rng_rank{R}.pt (each rank's CPU/CUDA/megatron-tracker RNG) + ov3_config.json
    DIR/latest             "iter_0000100"

A save writes into ``iter_N.partial``; only when every rank has finished does rank 0 rename it to ``iter_N``
and then replace ``latest`` (write-to-temp + rename). A crash or ``kill -9`` at any point leaves the previous
``latest`` and its directory untouched. ``--keep-last N`` prunes older ``iter_*`` directories afterwards.
RNG files are plain tensor dicts loaded with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist

LATEST = "latest"
_TAG = re.compile(r"^iter_(\d{7,})$")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_latest(directory: str) -> Optional[str]:
    """The complete checkpoint tag ``latest`` points to (None when there is none)."""
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not _TAG.match(tag) or not os.path.isdir(os.path.join(directory, tag)):
        raise ValueError(f"{path} points to {tag!r}, which is not a complete checkpoint directory")
    return tag


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, s in get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = s
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


def save(engine, directory: str, iteration: int, client_state: dict, model_config: dict,
         keep_last: Optional[int] = None, extra=None) -> str:
    """Collective. ``extra(partial_dir)`` adds more files (the universal copy) before the rename."""
    tag = tag_for(iteration)
    partial = tag + ".partial"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(os.path.join(directory, partial), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(directory, tag=partial, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(directory, partial, f"rng_rank{rank}.pt"))
    if extra is not None:
        extra(os.path.join(directory, partial))
    if rank == 0:
        with open(os.path.join(directory, partial, "ov3_config.json"), "w") as f:
            json.dump(model_config, f, indent=1, default=str)
    dist.barrier()
    if rank == 0:
        if os.environ.get("OV3_FAULT_KILL_IN_SAVE"):  # fault injection for the crash-safety test
            os.kill(os.getpid(), 9)
        final = os.path.join(directory, tag)
        if os.path.isdir(final):  # re-saving an iteration: move the old copy aside first
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(os.path.join(directory, partial), final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(os.path.join(directory, partial), final)
        tmp = os.path.join(directory, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, LATEST))
        if keep_last:
            prune(directory, keep_last, tag)
    dist.barrier()
    return tag


def prune(directory: str, keep_last: int, current: str) -> None:
    tags = sorted((t for t in os.listdir(directory) if _TAG.match(t)), key=lambda t: int(_TAG.match(t).group(1)))
    for t in tags[:-keep_last]:
        if t != current:
            shutil.rmtree(os.path.join(directory, t), ignore_errors=True)


def load(engine, directory: str, module_only: bool = False, load_optimizer: bool = True,
         load_scheduler: Optional[bool] = None):
    """Load ``latest`` from ``directory`` into the engine; returns (tag, client_state, rng dict or None).
    ``load_scheduler`` (default: unless ``module_only``) restores the learning-rate schedule's position."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    tag = read_latest(directory)
    if tag is None:
        raise FileNotFoundError(f"{directory!r} has no '{LATEST}' file; is it a megatron_ov3 checkpoint directory?")
    path, client = engine.load_checkpoint(
        directory, tag=tag, load_module_only=module_only, load_optimizer_states=load_optimizer and not module_only,
        load_lr_scheduler_states=(not module_only) if load_scheduler is None else load_scheduler,
    )
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)!r}")
    rng_file = os.path.join(directory, tag, f"rng_rank{dist.get_rank()}.pt")
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if os.path.isfile(rng_file) else None
    return tag, client or {}, rng
