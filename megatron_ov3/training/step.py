"""The forward/backward/optimizer pieces of one training iteration, for the plain and the pipelined engine.

Both return per-micro-batch metrics and whether every rank's loss was finite; what to do with a non-finite loss
(skip, count, stop) is decided once, by the trainer. Host synchronisations are what a GPU step must not pay for:
a micro-batch costs exactly one (:func:`agree`: every rank's loss finite? any rank asked to stop?), the metrics
stay on the device as 0-d tensors until the log interval reduces them, and the decoder-noise seeds never leave
the host (``tests/unit/test_host_syncs.py`` counts them).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..losses import EmbeddingPool

Metrics = Dict[str, torch.Tensor]

HOST_KEYS = ("noise_seeds",)
"""Batch entries that stay on the host: the decoder reads them as Python ints (one generator per sample); a copy on
the device would cost a host synchronisation to read back."""


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v if k in HOST_KEYS or not torch.is_tensor(v) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


class Stopwatch:
    """Seconds spent in a region of the step, without a host synchronisation per use: CUDA events on a GPU (read
    at the log interval, when the step has synchronised anyway), the wall clock elsewhere."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.spans: list = []
        self.seconds = 0.0

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start

    def read(self) -> float:
        """Seconds since the last read."""
        if self.spans:
            self.spans[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.spans) / 1000.0
            self.spans = []
        out, self.seconds = self.seconds, 0.0
        return out


def pool_slot(engine, batch, device) -> Dict[str, torch.Tensor]:
    """One micro-batch's share of the contrastive pool (and the latents it encoded), without gradients."""
    with torch.no_grad():
        return engine(dict(to_device(batch, device), pool_only=True))


def make_pool(slots: List[Dict[str, torch.Tensor]]) -> EmbeddingPool:
    """The :class:`~megatron_ov3.losses.EmbeddingPool` of a window's slots (:func:`pool_slot`), in order."""
    texts = sorted(k for k in slots[0] if k.startswith("text"))
    return EmbeddingPool(torch.cat([s["image"] for s in slots]), [torch.cat([s[k] for s in slots]) for k in texts],
                         rows=slots[0]["image"].shape[0])


def with_pool(batch, slot: Dict[str, torch.Tensor], pool: EmbeddingPool, index: int):
    """A micro-batch that reads the pool at ``index`` and reuses the latents its pool pass encoded."""
    out = dict(batch, contrastive_pool=pool.at(index))
    if slot.get("latents") is not None and batch.get("latents") is None:
        out["latents"] = slot["latents"]
    return out


def agree(loss: torch.Tensor, stop_requested: bool) -> Tuple[bool, bool]:
    """(every rank's ``loss`` is finite, some rank asked to stop), in one all-reduce and one host sync: the
    signal flag travels with the finite check the step needs anyway, instead of an all-reduce of its own."""
    finite = torch.isfinite(loss.detach()).all().float()
    flags = torch.stack([finite, finite.new_full((), 0.0 if stop_requested else 1.0)])  # filled on the device
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    ok, go_on = flags.tolist()
    return ok > 0, go_on == 0


def detached(out: Dict[str, torch.Tensor]) -> Metrics:
    """The step's outputs as 0-d fp32 metrics, still on the device."""
    return {k: v.detach().float() for k, v in out.items()}


def micro_step(engine, batch, device, own_grad_norm: bool, stop_requested: bool = False
               ) -> Tuple[Optional[Metrics], Optional[torch.Tensor], bool]:
    """One micro-batch through the DeepSpeed engine (forward, backward, engine step, which applies the optimizer
    at the accumulation boundary). Returns (metrics, or None when some rank's loss is non-finite; the gradient
    norm when we compute it (ZeRO-0 in fp32 keeps none), a 0-d tensor; whether some rank asked to stop)."""
    out = engine(to_device(batch, device))
    loss = out["total_loss"]
    finite, stop = agree(loss, stop_requested)
    if not finite:
        return None, None, stop
    engine.backward(loss)
    norm = None
    if own_grad_norm and engine.is_gradient_accumulation_boundary():
        norm = grad_norm(engine.module)  # reduced over DP by now, not yet clipped
    engine.step()
    return detached(out), norm, stop


def pipeline_pool(model, batches, device, plan) -> Optional[EmbeddingPool]:
    """The contrastive pool of a window under pipeline parallelism: megatron-core's schedule forward-only and
    without gradients over the window's micro-batches (the encoder's activations cross the stages as in training);
    the last stage, which computes the loss, gets the pool (the others None)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, module):
        out = module(dict(to_device(next(data_iterator), device), pool_only=True))
        if not module.post_process:
            return out, None
        return torch.zeros((), device=device), lambda t: (t, out)

    with torch.no_grad():
        slots = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=plan.grad_accum, seq_length=model.cfg.seq_length,
            micro_batch_size=plan.micro_batch_size, forward_only=True)
    return make_pool(slots) if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def pipeline_step(engine, data, device, plan, stop_requested: bool = False, pool_watch: Optional[Stopwatch] = None
                  ) -> Tuple[List[Dict[str, float]], bool, bool]:
    """One iteration under pipeline parallelism: megatron-core's 1F1B schedule runs forward and backward of all
    ``grad_accum`` micro-batches over the stages; then DeepSpeed reduces the gradients over the data-parallel
    group and its (ZeRO-1) optimizer steps. With ``pool_watch`` the contrastive loss spans the window
    (:func:`pipeline_pool` first, timed by it). Returns (per-micro-batch metrics on every rank, all finite, some
    rank asked to stop). The metrics cross the pipeline as Python floats, one broadcast per iteration."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = engine.module
    if pool_watch is not None:
        batches = [next(data) for _ in range(plan.grad_accum)]
        with pool_watch:
            pool = pipeline_pool(model, batches, device, plan)
        data = iter([b if pool is None else dict(b, contrastive_pool=pool.at(j)) for j, b in enumerate(batches)])

    def forward_step(data_iterator, module):
        out = module(to_device(next(data_iterator), device))
        if not module.post_process:
            return out, None
        # clone: megatron's schedule divides the returned loss by the number of micro-batches *in place*, and a
        # detached view would carry that division into the logged metrics
        return out["total_loss"], lambda loss: (loss, {k: v.detach().clone().float() for k, v in out.items()})

    outs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=plan.grad_accum,
        seq_length=model.cfg.seq_length, micro_batch_size=plan.micro_batch_size, forward_only=False,
    )
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    losses = torch.stack([o["total_loss"] for o in outs]) if last else torch.zeros(1, device=device)
    finite, stop = agree(losses, stop_requested)
    if not finite:
        for p in model.parameters():
            p.grad = None
        return [], False, stop
    engine.allreduce_gradients()
    engine.step()
    # metrics travel from the last stage to every rank of the pipeline group (rank 0 logs)
    holder = [[{k: float(v) for k, v in o.items()} for o in outs] if last else None]
    dist.broadcast_object_list(holder, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return holder[0], True, stop


def grad_norm(model) -> torch.Tensor:
    """Global L2 norm of the gradients (what DeepSpeed reports for its other optimizers): parameters replicated
    over tensor parallelism counted once, shards summed over the TP group."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.detach().double().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    return sq.sqrt()
