"""The typed configuration tree of a training job (see :mod:`megatron_ov3.config.job`)."""
from .job import (SECTIONS, BatchPlan, CheckpointConfig, EvalConfig, JobConfig, LoggingConfig, OptimConfig,
                  ParallelConfig, TrainConfig, build_parser, job_from_dict, parse_job, resolve)

__all__ = ["SECTIONS", "BatchPlan", "CheckpointConfig", "EvalConfig", "JobConfig", "LoggingConfig", "OptimConfig",
           "ParallelConfig", "TrainConfig", "build_parser", "job_from_dict", "parse_job", "resolve"]
