"""Process groups: torch.distributed + megatron-core parallel_state, set up once per process.

Models never talk to torch.distributed directly; they use megatron-core layers (which use parallel_state)
and the helpers here (e.g. :func:`data_parallel_group` for the contrastive loss).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from . import cpu_shim


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# rank, world size and local rank as each launcher exports them (torchrun/DeepSpeed's pdsh runner: RANK, ...)
LAUNCHER_VARIABLES = (
    ("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("MPICH/Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def adopt_launcher_env(environ=None) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK from an MPI or Slurm launcher's own variables when they are not set (the
    DeepSpeed launcher's openmpi/mpich/mvapich/slurm runners start ranks with those), set in ``environ``
    (default ``os.environ``). MASTER_ADDR/MASTER_PORT must then come from the launch (see the README)."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return {}
    for name, rank, size, local in LAUNCHER_VARIABLES:
        if rank in env and size in env:
            found = {"RANK": env[rank], "WORLD_SIZE": env[size], "LOCAL_RANK": env.get(local, "0")}
            if "MASTER_ADDR" not in env:
                from ..errors import UsageError

                raise UsageError(f"started by {name} ({rank} is set) without MASTER_ADDR; export MASTER_ADDR "
                                 f"(the first host) and MASTER_PORT to every rank (README: Multi-node)")
            env.setdefault("MASTER_PORT", "29500")
            env.update(found)
            return found
    return {}


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from the launcher's environment (RANK/WORLD_SIZE/MASTER_ADDR/...), or as
    a 1-process group when nothing launched us. NCCL when CUDA is available, gloo otherwise."""
    if dist.is_initialized():
        return
    cpu_shim.install()
    adopt_launcher_env()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    else:  # not launched: a 1-process group (DeepSpeed still wants LOCAL_RANK; nothing else is exported,
        # so child processes never mistake themselves for launched ranks)
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
            timeout=timedelta(minutes=timeout_minutes),
        )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """torch.distributed (if needed) + megatron-core parallel_state + megatron's RNG tracker.

    Seeds: every rank uses ``seed`` for the default generator (so non-megatron parameters and the decoder
    noise are identical across tensor-parallel ranks); megatron's tracker adds its per-TP-rank stream."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed()
    world = dist.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % mp:
        raise ValueError(
            f"world size {world} is not divisible by tensor x pipeline parallel size "
            f"{tensor_model_parallel_size}x{pipeline_model_parallel_size}; change the sizes or the process count"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def data_parallel_group():
    """The data-parallel process group (None when torch.distributed is not initialised)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None
    return ps.get_data_parallel_group()
