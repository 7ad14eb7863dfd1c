"""The trainer: a :class:`~megatron_ov3.config.JobConfig` in, a trained and checkpointed model out.

Components (each its own module, each testable alone): the model builder (:mod:`.model_builder`), the optimizer
and schedule (:mod:`.optim`), the DeepSpeed config (:mod:`.ds_config`), the step pieces (:mod:`.step`), metrics
sinks (:mod:`.metrics`), the train state (:mod:`.state`) and checkpoints (:mod:`megatron_ov3.checkpointing`).
:func:`run` is the short sequence that wires them; :meth:`Trainer.train_step` is one iteration of either engine.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import parallel
from ..checkpointing import deepspeed_io, restore, universal
from ..checkpointing import format as ckpt_format
from ..config.job import BatchPlan, JobConfig
from ..errors import UsageError, short_repr
from ..models.accounting import step_flops_per_sample
from ..models.specs import resolve_backend
from ..parallel.build_lock import clear_stale_build_locks, prefer_environment_ninja
from . import step as steps
from .ds_config import deepspeed_config
from .metrics import sinks_for
from .model_builder import build_data, build_model_for_job, latent_input, memory_mb
from .optim import build_optimizer
from .state import RNGState, TrainState


class StopTraining(Exception):
    """Too many consecutive non-finite losses: the run stops with exit code 1 and this message."""


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


class Signals:
    """SIGTERM/SIGINT: finish the current step, save, exit 0 (agreed across ranks)."""

    def __init__(self):
        self.received = False
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame):
        self.received = True


def decide_once(job: JobConfig) -> dict:
    """Choices a run makes from its surroundings, made on rank 0 and broadcast, so every rank of every host
    takes the same one: whether ``--load`` holds a checkpoint to resume (else fresh / --finetune-from). A usage
    error found here (``latest`` naming nothing, a ``--save`` that cannot be written) reaches every rank."""
    ck = job.checkpoint
    holder = [None]
    if dist.get_rank() == 0:
        try:
            if ck.save:
                ckpt_format.check_writable(ck.save)
            holder[0] = {"resume": bool(ck.load and os.path.isdir(ck.load) and ckpt_format.read_latest(ck.load))}
        except UsageError as e:  # e.g. 'latest' names nothing: every rank reports it, none waits for rank 0
            holder[0] = {"error": str(e)}
    dist.broadcast_object_list(holder, src=0)
    if "error" in holder[0]:
        raise UsageError(holder[0]["error"])
    return holder[0]


def software_facts(job: JobConfig) -> dict:
    """What each rank must agree on: the resolved job and the software that realises it."""
    import deepspeed
    import megatron.core

    return {"job": job.to_dict(), "transformer_impl": resolve_backend(job.layers.transformer_impl),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron-core": getattr(megatron.core, "__version__", "?"),
            "simulated": os.environ.get("OV3_SIMULATE_SOFTWARE", "")}


def check_ranks_agree(facts: dict) -> None:
    """Every rank compares its facts with rank 0's; a difference (e.g. Transformer Engine importable on one
    host only, another DeepSpeed) is a usage error on *every* rank, naming the rank, host and the value."""
    import socket

    everyone: List[Optional[tuple]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), facts))
    host0, ref = everyone[0]
    for rank, (host, mine) in enumerate(everyone):
        for key in ref:
            if mine[key] != ref[key]:
                what = key if key != "job" else "the resolved job configuration (different flags or files)"
                raise UsageError(f"rank {rank} on {host} disagrees with rank 0 on {host0} about {what}: "
                                 f"{short_repr(mine[key])} vs {short_repr(ref[key])}; install the same software and "
                                 f"launch the same command on every host")


class Trainer:
    """Holds the engine, the data, the state and the metrics of one run."""

    def __init__(self, job: JobConfig, plan: BatchPlan, world: int, resume: bool = False):
        import deepspeed
        from megatron.core import parallel_state as ps

        self.job, self.plan, self.world = job, plan, world
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.total_iters = job.train.total_iters()
        self.pipelined = job.parallel.pipeline_model_parallel_size > 1
        self.resume = resume
        self.model, self.vae = build_model_for_job(job, self.device, log0, init=not resume)
        opt, sched = build_optimizer(self.model, job.optim, self.total_iters, self.device)
        if job.parallel.overlap_grad_reduce and self.pipelined:
            log0("note: --overlap-grad-reduce is ignored under pipeline parallelism (gradients are reduced once, "
                 "after the 1F1B schedule)")
        from .mpu import MegatronMPU

        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=opt, lr_scheduler=sched,
                                                    config=deepspeed_config(job, plan), mpu=MegatronMPU())
        self.state, self.rng = TrainState(), RNGState()
        self.data = None
        self.own_grad_norm = job.parallel.zero_stage == 0 and not job.layers.bf16
        self._sums: Dict[str, torch.Tensor] = {}
        self.stop_requested = False
        self._n, self._samples, self._t = 0, 0, time.time()
        self._grad_norm: Optional[torch.Tensor] = None
        self._flops = None
        self.latent_input = False
        cfg = self.model.cfg
        pooled = (job.train.contrastive_global_batch and plan.grad_accum > 1 and not cfg.freeze_encoder
                  and cfg.contrastive_weight > 0)
        self.pool_watch = steps.Stopwatch(self.device) if pooled else None  # the pool pass's time, when there is one
        self.metrics = sinks_for(job.logging, self.total_iters, job.to_dict(), dist.get_rank())

    # ---------------------------------------------------------------- start
    def start(self) -> None:
        """Resume, start a new stage, or start fresh; then open the data stream at the right position."""
        ck = self.job.checkpoint
        data_state = None
        if ck.load and not self.resume:
            then = "from --finetune-from" if ck.finetune_from else ("from --init-universal" if ck.init_universal
                                                                   else "fresh")
            log0(f"--load {ck.load} holds no checkpoint yet: starting {then}")
        if self.resume:
            client, rng, how = restore.resume(self.engine, ck.load, self.job.parallel.zero_stage)
            self.state.load_state_dict(client)
            if rng is not None and not self.rng.load_state_dict(rng):
                log0("note: the checkpoint's random generators were saved on another kind of device (CPU vs GPU); "
                     "dropout and noise continue from this run's seed, so the resume is not bit-exact")
            data_state = restore.data_state_for(client, self.dp_size, self.dp_rank, log0)
            tag_dir = os.path.join(ck.load, ckpt_format.read_latest(ck.load))
            log0(f"resumed from {tag_dir} at iteration {self.state.iteration} ({self.state.consumed_samples} "
                 f"samples; {how})")
            self._warn_if_stage_changed(tag_dir)
        elif ck.finetune_from:
            restore.restore_weights(self.engine, ck.finetune_from, self.job.parallel.zero_stage, ck.keep_optimizer)
            cfg = self.model.cfg
            pos = ("sincos position embeddings re-evaluated on the new grid" if cfg.position_embedding_type == "sincos"
                   else f"learned {cfg.pos_embed_ref_grid}x{cfg.pos_embed_ref_grid} position table resized to the "
                        f"new grid")
            log0(f"stage start from {ck.finetune_from} at {cfg.image_size}px ({pos}; optimizer "
                 f"{'kept' if ck.keep_optimizer else 'reset'})")
        self.data = build_data(self.job, self.plan, self.dp_rank, self.dp_size, data_state,
                               self.state.consumed_samples, log0)
        self.latent_input = latent_input(self.job)

    def _warn_if_stage_changed(self, tag_dir: str) -> None:
        """Resuming at another resolution continues the old schedule and data position: say so."""
        import json

        path = os.path.join(tag_dir, "ov3_config.json")
        if not os.path.isfile(path):
            return
        saved = json.load(open(path)).get("image_size")
        if saved is not None and saved != self.model.cfg.image_size:
            log0(f"warning: {tag_dir} was trained at {saved}px and this run resumes it at "
                 f"{self.model.cfg.image_size}px with its schedule and data position; for a new stage use "
                 f"--finetune-from {os.path.dirname(tag_dir)}")

    def describe(self) -> str:
        j, p = self.job, self.plan
        n_params = sum(getattr(q, "ds_numel", q.numel()) for q in self.model.parameters())  # ZeRO-3 empties q
        fp8 = j.layers.fp8_format
        return (f"OV3-{j.model.size} {j.model.image_size}px: {n_params:,} trainable params on this model-parallel "
                f"rank | world {self.world} = TP {j.parallel.tensor_model_parallel_size} x PP "
                f"{j.parallel.pipeline_model_parallel_size} x DP {self.dp_size} | micro {p.micro_batch_size} x accum "
                f"{p.grad_accum} x DP {self.dp_size} = global {p.global_batch_size} | ZeRO-{j.parallel.zero_stage} | "
                f"{'bf16' if j.layers.bf16 else 'fp32'}{' fp8-' + fp8 if fp8 else ''} | layers: "
                f"{resolve_backend(j.layers.transformer_impl)}/{j.layers.attention_backend}"
                f"{' compiled' if j.layers.torch_compile else ''} | {self.total_iters} iterations")

    # ---------------------------------------------------------------- one iteration
    def _skipped(self, what: str) -> None:
        """The one place a non-finite loss is handled: count it, and stop after too many in a row."""
        self.state.skipped_steps += 1
        self.state.bad_streak += 1
        log0(f"iteration {self.state.iteration + 1}: non-finite loss{what} ({self.state.bad_streak} in a row)")
        limit = self.job.train.max_bad_steps
        if self.state.bad_streak >= limit:
            raise StopTraining(f"stopping: {self.state.bad_streak} consecutive non-finite losses "
                               f"(--max-bad-steps {limit}); lower --lr or check the data")

    def train_step(self, signaled: bool = False) -> bool:
        """One iteration (all its micro-batches and one optimizer step). False: a pipelined step was skipped
        for a non-finite loss (its data is consumed, the iteration does not advance). ``signaled``: this rank got
        SIGTERM/SIGINT; whether any rank did is agreed inside the step (``stop_requested`` after it)."""
        self.stop_requested = False
        if self.pipelined:
            outs, finite, self.stop_requested = steps.pipeline_step(self.engine, self.data, self.device, self.plan,
                                                                    signaled, self.pool_watch)
            if not finite:
                self._skipped(", step skipped")
                self.state.consumed_samples += self.plan.global_batch_size
                return False
        else:
            outs = self._accumulate(signaled)
        self.state.bad_streak = 0
        for out in outs:  # device tensors (plain path) or floats (pipelined): summed where they are
            for k, v in out.items():
                self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._n += len(outs)
        self.state.iteration += 1
        self.state.consumed_samples += self.plan.global_batch_size
        self._samples += self.plan.global_batch_size
        return True

    def _accumulate(self, signaled: bool) -> List[steps.Metrics]:
        """The plain engine's micro-batches of one iteration. With a contrastive pool the window's micro-batches
        are read first and their embeddings computed without gradients (timed), so each micro-batch's contrastive
        loss spans the global batch. A non-finite micro-batch is replaced by the next one (its pool slot too; the
        micro-batches before it saw the old slot, so that step is not exactly the global-batch gradient)."""
        a, pooled = self.plan.grad_accum, self.pool_watch is not None
        batches = [next(self.data) for _ in range(a)] if pooled else []
        slots, pool = [], None
        if pooled:
            with self.pool_watch:
                slots = [steps.pool_slot(self.engine, b, self.device) for b in batches]
                pool = steps.make_pool(slots)
        outs = []
        while len(outs) < a:
            j = len(outs)
            batch = steps.with_pool(batches[j], slots[j], pool, j) if pooled else next(self.data)
            out, norm, stop = steps.micro_step(self.engine, batch, self.device, self.own_grad_norm, signaled)
            self.stop_requested |= stop
            if out is None:
                self._skipped(" on some rank, micro-batch skipped")
                if pooled:
                    batches[j] = next(self.data)
                    with self.pool_watch:
                        slots[j] = steps.pool_slot(self.engine, batches[j], self.device)
                        pool = pool.replaced(j, slots[j])
                continue
            self._grad_norm = norm if norm is not None else self._grad_norm
            outs.append(out)
        return outs

    # ---------------------------------------------------------------- logging
    def log_metrics(self) -> None:
        """Average the interval's metrics over the data-parallel ranks and write one record to every sink."""
        from megatron.core import parallel_state as ps

        if self._flops is None:
            self._flops = step_flops_per_sample(self.model.cfg, self.model.cfg.image_size, self.vae,
                                                encode_in_step=not self.latent_input,
                                                micro_batch=self.plan.micro_batch_size)
        keys = sorted(self._sums)
        vec = torch.stack([torch.as_tensor(self._sums[k], device=self.device).double() for k in keys]
                          + [torch.tensor(float(self._n), device=self.device, dtype=torch.float64)])
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
        dt = time.time() - self._t
        sps = self._samples / dt
        gn = self.engine.get_global_grad_norm()
        gn = self._grad_norm if gn is None else gn
        mem_max = torch.tensor([memory_mb(self.device)], device=self.device)
        dist.all_reduce(mem_max, op=dist.ReduceOp.MAX)  # the most loaded rank (e.g. the last pipeline stage)
        pool_s = self.pool_watch.read() if self.pool_watch is not None else None
        record = {"iteration": self.state.iteration, **{k: float(vec[i] / vec[-1]) for i, k in enumerate(keys)},
                  "lr": self.engine.lr_scheduler.get_last_lr()[0], "grad_norm": None if gn is None else float(gn),
                  "samples_per_s": sps, "tflops_per_device": self._flops["total"] * sps / self.world / 1e12,
                  "step_time_s": dt * self.plan.global_batch_size / self._samples,
                  "memory_mb": memory_mb(self.device), "memory_mb_max_rank": float(mem_max),
                  "bad_samples": _bad_counts_over_dp(self.data, self.device), "skipped_steps": self.state.skipped_steps}
        if pool_s is not None:  # the extra no-grad forward of the towers the global-batch contrastive loss costs
            record["contrastive_pool_share"] = pool_s / dt
        self.metrics.write(record)
        self._sums, self._n, self._samples, self._t = {}, 0, 0, time.time()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The client state a checkpoint records: counters and every data-parallel rank's data position."""
        from megatron.core import parallel_state as ps

        states: List[Optional[dict]] = [None] * self.dp_size
        dist.all_gather_object(states, self.data.state_dict(), group=ps.get_data_parallel_group())
        return {**self.state.state_dict(), "data_states": states}

    def save(self) -> None:
        """DeepSpeed's own save plus the small universal index (resharding later costs this save nothing);
        ``--save-universal`` also writes the universal copy now (rank 0, from the files just published)."""
        ck, zero = self.job.checkpoint, self.job.parallel.zero_stage
        client = self.state_dict()
        t = time.time()
        meta = dict(client, scheduler=self.engine.lr_scheduler.state_dict(), model_config=self.model.cfg.to_dict(),
                    vae=self.job.vae.checkpoint_meta(), **restore.current_layout(zero))
        files = {"ov3_config.json": self.model.cfg.to_dict(), "job_config.json": self.job.to_dict()}
        tag = deepspeed_io.save(self.engine, ck.save, self.state.iteration, client, files, ck.keep_last,
                                extra=lambda d: universal.write_index(self.engine, d, meta), rng=self.rng.state_dict(),
                                timeout_s=60.0 * self.job.parallel.distributed_timeout_minutes)
        log0(f"saved checkpoint {os.path.join(ck.save, tag)} in {time.time() - t:.1f}s (sealed and published in the "
             f"background)")
        if ck.save_universal and zero != 3:
            ckpt_format.wait_for_publish()
            dist.barrier()
            t = time.time()
            restore.universal_for(os.path.join(ck.save, tag), log0)
            log0(f"universal copy written in {time.time() - t:.1f}s (--save-universal)")

    def evaluate(self) -> None:
        from .evaluation import evaluate_in_training

        evaluate_in_training(self, log0)


def _bad_counts_over_dp(data, device) -> Dict[str, int]:
    """Skipped samples per reason, summed over the data-parallel ranks (each reads its own shards)."""
    from megatron.core import parallel_state as ps

    local = data.bad_counts()
    keys = sorted(local)
    if not keys or ps.get_data_parallel_world_size() == 1:
        return local
    vec = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec, group=ps.get_data_parallel_group())
    return {k: int(v) for k, v in zip(keys, vec.tolist())}


def _after_step(tr: Trainer) -> bool:
    """Logging, evaluation and checkpointing due after an iteration; True when the run should end now."""
    job, it = tr.job, tr.state.iteration
    if it % job.logging.log_interval == 0 or it == tr.total_iters:
        tr.log_metrics()
    if job.eval.eval_interval and it % job.eval.eval_interval == 0:
        tr.evaluate()
    stop = tr.stop_requested  # agreed over the ranks inside the step
    exit_now = bool(job.train.exit_interval and it % job.train.exit_interval == 0 and it < tr.total_iters)
    ck = job.checkpoint
    if ck.save and ((ck.save_interval and it % ck.save_interval == 0) or it == tr.total_iters or stop or exit_now):
        tr.save()
    if stop or exit_now:
        log0(f"{'signal received' if stop else '--exit-interval reached'}: "
             f"{'saved' if ck.save else 'not saved (no --save)'} at iteration {it}, exiting")
    return stop or exit_now


def setup(job: JobConfig, world: int) -> Trainer:
    """Process group, parallel state and a started :class:`Trainer` (resumed, new stage, or fresh)."""
    import deepspeed

    plan = job.validate(world)  # usage errors never need the network
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_ov3/torch_extensions"))
    parallel.init_distributed(timeout_minutes=job.parallel.distributed_timeout_minutes)
    parallel.initialize_model_parallel(job.parallel.tensor_model_parallel_size,
                                       job.parallel.pipeline_model_parallel_size, seed=job.train.seed)
    clear_stale_build_locks(log0)  # DeepSpeed's JIT build would otherwise wait forever on a killed run's lock
    prefer_environment_ninja()  # one ninja for every rank's build, however the rank was started
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    check_ranks_agree(software_facts(job))
    tr = Trainer(job, plan, world, resume=decide_once(job)["resume"])
    tr.start()
    return tr


def run(job: JobConfig, world: int) -> int:
    """Train ``job`` on ``world`` processes (this is one of them). Returns the exit code."""
    tr = setup(job, world)
    signals = Signals()
    log0(tr.describe())
    tr.engine.train()
    try:
        while tr.state.iteration < tr.total_iters:
            if tr.train_step(signals.received) and _after_step(tr):
                break
    except StopTraining as stop:
        log0(str(stop))
        return 1
    finally:
        tr.metrics.close()
        ckpt_format.wait_for_publish()  # the last save is on disk before the process reports or exits
    latest = ckpt_format.read_latest(job.checkpoint.save) if job.checkpoint.save else None
    if latest:
        log0(f"checkpoint: {os.path.abspath(os.path.join(job.checkpoint.save, latest))}")
    log0("training finished")
    return 0
