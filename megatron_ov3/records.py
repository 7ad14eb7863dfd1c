"""The training metrics record: the JSONL schema every producer and reader shares (a leaf: no torch, nothing of the
package above it). The trainer writes records (:mod:`megatron_ov3.training.metrics`); the scaling study
(:mod:`megatron_ov3.scaling.measure`), the curves (:mod:`megatron_ov3.eval.curves`) and the tools read them.

A record is one flat dict: ``iteration``, every loss and metric the model returns (averaged over the log interval and
the data-parallel ranks), then the keys of :data:`RECORD_KEYS` (and ``contrastive_pool_share`` when the contrastive
loss spans an accumulation window).
"""
from __future__ import annotations

import json
from typing import List

RECORD_KEYS = ("lr", "grad_norm", "samples_per_s", "tflops_per_device", "step_time_s", "memory_mb",
               "memory_mb_max_rank", "bad_samples", "skipped_steps")
"""Keys every record has besides ``iteration`` and the model's own losses/metrics."""


def read_jsonl(path: str) -> List[dict]:
    """The records of a metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
