"""The DeepSpeed configuration: a pure function of the job configuration and its batch plan."""
from __future__ import annotations

from ..config.job import BatchPlan, JobConfig


def deepspeed_config(job: JobConfig, plan: BatchPlan) -> dict:
    """The dict ``deepspeed.initialize(config=...)`` gets. Under pipelining megatron's 1F1B schedule accumulates
    the micro-batches itself, so DeepSpeed sees one "micro" step of all of them; ``overlap_comm`` is only set
    without pipelining (the schedule runs backward outside the engine, so DeepSpeed's reduce hooks would fire
    on every micro-batch)."""
    par = job.parallel
    pipelined = par.pipeline_model_parallel_size > 1
    zero = {"stage": par.zero_stage}
    if par.overlap_grad_reduce and par.zero_stage in (1, 2) and not pipelined:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size * (plan.grad_accum if pipelined else 1),
        "gradient_accumulation_steps": 1 if pipelined else plan.grad_accum,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": job.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(job.layers.bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
