"""Training metrics: one record per logged iteration, written to pluggable sinks (rank 0 only).

The record is one flat dict, the JSONL schema shared with :mod:`megatron_ov3.scaling.measure` (which reads
``step_time_s`` and ``memory_mb_max_rank`` back): ``iteration``, every loss and metric the model returns
(averaged over the interval and the data-parallel ranks), then the keys of
:data:`~megatron_ov3.records.RECORD_KEYS` (the schema's leaf module).
Sinks: :class:`ConsoleSink` (the log line), :class:`JsonlSink` (``--metrics-file``), :class:`TensorBoardSink`
(``--tensorboard-dir``) and :class:`WandbSink` (``--wandb-project``); a new sink is a class with
``write(record)`` and ``close()``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable

from ..errors import UsageError
from ..models import LOSS_NAMES

from ..records import RECORD_KEYS, read_jsonl  # noqa: F401 (the schema lives in the leaf module; public here too)


class ConsoleSink:
    """The one-line training log (iteration k/N, every loss, lr, grad norm, throughput, memory, ETA)."""

    def __init__(self, total_iters: int):
        self.total = total_iters

    def write(self, r: dict) -> None:
        losses = " | ".join(f"{k} {r[k]:.4f}" for k in ("total_loss",) + LOSS_NAMES if k in r)
        from ..data.pipeline import NOT_SAMPLES

        bad = {k: v for k, v in r["bad_samples"].items() if k not in NOT_SAMPLES}
        retries = r["bad_samples"].get("shard_retry", 0)
        eta = (self.total - r["iteration"]) * r["step_time_s"]
        gn = float("nan") if r["grad_norm"] is None else r["grad_norm"]
        acc = f" | acc i2t {r['contrastive_acc_i2t']:.3f}" if "contrastive_acc_i2t" in r else ""
        rms = f" | token rms {r['encoder_token_rms']:.3f}" if "encoder_token_rms" in r else ""
        rms += f" | pool pass {r['contrastive_pool_share']:.0%}" if "contrastive_pool_share" in r else ""
        print(f"iteration {r['iteration']:6d}/{self.total} | {losses}{acc}{rms}"
              f" | lr {r['lr']:.3e} | grad norm {gn:.3f} | samples/s {r['samples_per_s']:.1f} | "
              f"TFLOP/s/device {r['tflops_per_device']:.4f} | mem {r['memory_mb']:.0f} MB | "
              f"skipped steps {r['skipped_steps']} | bad samples {sum(bad.values())}"
              + (f" | shard retries {retries}" if retries else "")
              + (f" {({k: v for k, v in bad.items() if v})}" if any(bad.values()) else "")
              + f" | ETA {_duration(eta)}", flush=True)

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class JsonlSink:
    """Appends each record as one JSON line."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            raise UsageError(f"--metrics-file {path!r} is a folder; give a file path")
        self.path, self._folder_made = path, False

    def write(self, r: dict) -> None:
        if not self._folder_made:  # at the first record, as tensorboard makes its folder (not before: a run
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)  # refused at start writes nothing)
            self._folder_made = True
        with open(self.path, "a") as f:
            f.write(json.dumps(r) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars under ``train/`` (losses, lr, throughput, grad norm, skipped steps) and ``data/bad_<reason>``. The
    event file is created with the first record, so a run that stops before its first step (a damaged checkpoint, a
    usage error) leaves the folder as it was."""

    def __init__(self, log_dir: str):
        if os.path.exists(log_dir) and not os.path.isdir(log_dir):
            raise UsageError(f"--tensorboard-dir {log_dir!r} is a file; give a folder path")
        self.log_dir, self._writer = log_dir, None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)
        return self._writer

    def write(self, r: dict) -> None:
        it = r["iteration"]
        for k, v in r.items():
            if k == "bad_samples":
                for reason, n in v.items():
                    self.writer.add_scalar(f"data/bad_{reason}", n, it)
            elif k != "iteration" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"train/{k}", v, it)
        self.writer.flush()

    def add_eval(self, iteration: int, report: dict, grid=None) -> None:
        for k, v in report.items():
            self.writer.add_scalar(f"eval/{k}", v, iteration)
        if grid is not None:
            self.writer.add_image("eval/reconstructions", grid, iteration)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class WandbSink:
    """wandb run (offline unless WANDB_MODE says otherwise)."""

    def __init__(self, project: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb-project needs wandb: pip install -e .[wandb]") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, config=config)

    def write(self, r: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in r.items() if isinstance(v, (int, float)) and k != "iteration"},
                     step=r["iteration"])

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fans one record out to every sink."""

    def __init__(self, sinks: Iterable):
        self.sinks = list(sinks)

    def write(self, record: Dict) -> None:
        for s in self.sinks:
            s.write(record)

    def add_eval(self, iteration: int, report: dict, grid=None) -> None:
        for s in self.sinks:
            if hasattr(s, "add_eval"):
                s.add_eval(iteration, report, grid)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def sinks_for(logging_cfg, total_iters: int, config: dict, rank: int) -> MetricsLogger:
    """The sinks a job asks for (rank 0 writes; other ranks get none)."""
    if rank != 0:
        return MetricsLogger([])
    sinks = [ConsoleSink(total_iters)]
    if logging_cfg.metrics_file:
        sinks.append(JsonlSink(logging_cfg.metrics_file))
    if logging_cfg.tensorboard_dir:
        sinks.append(TensorBoardSink(logging_cfg.tensorboard_dir))
    if logging_cfg.wandb_project:
        sinks.append(WandbSink(logging_cfg.wandb_project, config))
    return MetricsLogger(sinks)
