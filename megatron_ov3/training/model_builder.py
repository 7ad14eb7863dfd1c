"""Building what a job trains: the frozen VAE, this rank's model stage with everything applied around it
(converters, sequence-parallel gradient hooks, a universal initialisation), and the data stream."""
from __future__ import annotations

import resource
from typing import Callable, Optional

import torch

from ..config.job import BatchPlan, JobConfig


def build_model_for_job(job: JobConfig, device: torch.device, log: Callable[[str], None], init: bool = True):
    """(this rank's OV3 stage, the frozen VAE). Call after the parallel state exists. ``init`` False: a resumed
    run, whose weights come from its checkpoint (``--init-universal`` is skipped)."""
    from ..checkpointing.restore import init_from_universal
    from ..converters import apply_converters
    from ..data.latent_cache import check_latent_normalisation
    from ..models import build_model
    from ..parallel.sequence_parallel import install_grad_hooks

    vae = job.vae.build()
    if job.data.data_path:
        check_latent_normalisation(job.data.data_path, vae, job.model.image_size, job.data.augmentation())
    model = build_model(job.model, job.layers, vae=vae)
    model.to_frozen(device)
    for line in apply_converters(model, job.layers, device):  # around the model: torchao float8, torch.compile
        log(line)
    if job.layers.sequence_parallel:  # around the model: TP all-reduce of the sequence-sharded parameters' grads
        log(f"sequence parallelism: {install_grad_hooks(model)} parameters get a TP gradient all-reduce")
    if init and job.checkpoint.init_universal:  # into the bare model, before ZeRO partitions anything
        init_from_universal(model, job.model, job.checkpoint.init_universal, log)
    return model, vae


def build_data(job: JobConfig, plan: BatchPlan, dp_rank: int, dp_size: int, state: Optional[dict],
               consumed_samples: int, log=print):
    """The resumable batch stream of this data-parallel rank: mock batches, or shards in the elastic order
    (:mod:`megatron_ov3.data.elastic`) when the layout allows it, else per-rank streams (said in one line)."""
    import dataclasses

    from ..data import DataIterator
    from ..data.elastic import ElasticIterator, auto_streams, why_not_elastic
    from ..data.mock import MockData
    from ..data.shards import expand_urls

    cfg = job.model
    if job.data.mock_data:
        return MockData(cfg.image_size, cfg.vocab_size, plan.micro_batch_size, plan.grad_accum, dp_rank, dp_size,
                        cfg.text_context_length, cfg.caption_length, seed=job.train.seed,
                        state=state if state and "consumed" in state else {"consumed": consumed_samples})
    data_cfg = dataclasses.replace(job.data, micro_batch_size=plan.micro_batch_size)
    sources = expand_urls(job.data.data_path)
    streams = job.data.data_streams or auto_streams(plan.global_batch_size, len(sources[0]))
    why = why_not_elastic(data_cfg, streams, plan.global_batch_size, dp_size, len(sources[0]), len(sources))
    if why is None:
        if state and "streams" in state and state["streams"] != streams:
            log(f"warning: the checkpoint's data was dealt into {state['streams']} streams and this run's into "
                f"{streams} (--data-streams, or the global batch changed); the data stream restarts")
            state = None
        return ElasticIterator(data_cfg, dp_rank, dp_size, plan.global_batch_size, streams,
                               state if state and "stream_pos" in state else None)
    log(f"note: the data order is per data-parallel rank ({why}); a resume at another data-parallel size or "
        f"worker count restarts the data stream")
    return DataIterator(data_cfg, dp_rank, dp_size, state=state if state and "raw_pos" in state else None)


def latent_input(job: JobConfig) -> bool:
    """Whether the job trains on cached latents (no VAE encode in the step: the FLOP count leaves it out), known
    from the data path before any batch exists (a pipelined step never shows the trainer its batches)."""
    from ..data.pipeline import source_kind
    from ..data.shards import expand_urls

    return not job.data.mock_data and source_kind(expand_urls(job.data.data_path)[0]) == "latent"


def memory_mb(device) -> float:
    """Peak memory of this rank: allocator bytes on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
