"""The training loop: megatron-core model + DeepSpeed ZeRO engine + resumable data + atomic checkpoints."""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from .. import parallel
from ..parallel.sequence_parallel import install_grad_hooks
from ..cli import UsageError
from ..data import DataConfig, DataIterator
from ..data.latent_cache import check_latent_normalisation
from ..data.mock import MockData
from ..data.tokenizer import Tokenizer
from ..models import FrozenVAE, LayerImplConfig, VAEDecodeConfig, LOSS_NAMES, build_model, get_config
from ..models.specs import resolve_backend
from ..converters import apply_converters
from . import checkpoint as ckpt
from . import universal
from .arguments import batch_plan, validate
from .flops import step_flops_per_sample
from .mpu import MegatronMPU


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


class _Signals:
    """SIGTERM/SIGINT: finish the current step, save, exit 0 (agreed across ranks)."""

    def __init__(self):
        self.received = False
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame):
        self.received = True

    def any_rank(self, device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def param_groups(model, weight_decay: float):
    """AdamW groups: no weight decay for biases, norms, tokens, position tables and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "pos_embed" in name or "class_token" in name or "registers" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# config fields that change which encoder parameters exist, and the flag that sets each
_INIT_FIELDS = {"pos_embed_type": "--position-embedding-type", "pos_embed_ref_grid": "--pos-embed-ref-grid",
                "class_token": "--class-token", "register_tokens": "--register-tokens"}


def check_init_compatible(cfg, directory: str) -> None:
    """``--init-universal`` needs the encoder options the checkpoint was made with; say which flag differs."""
    saved = universal.read_meta(directory).get("model_config", {})
    mine = cfg.to_dict()
    for field, flag in _INIT_FIELDS.items():
        if field in saved and saved[field] != mine[field]:
            raise UsageError(f"--init-universal {directory} was made with {field}={saved[field]!r} but this run "
                             f"has {mine[field]!r}; set {flag} to match")


def lr_lambda(args, total_iters: int):
    warm = args.lr_warmup_iters
    floor = args.min_lr / args.lr

    def f(it):
        if warm and it < warm:
            return (it + 1) / warm
        progress = min(1.0, (it - warm) / max(1, total_iters - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(args) -> int:
    import deepspeed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(args, world)
    # batch arithmetic is checked before any process group exists (usage errors never need the network)
    plan = batch_plan(args, world // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/megatron_ov3/torch_extensions"))
    parallel.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                       seed=args.seed)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    from megatron.core import parallel_state as ps

    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    total_iters = args.train_iters or -(-args.train_samples // plan.global_batch_size)

    vocab = Tokenizer(args.tokenizer).vocab_size if args.tokenizer else get_config(args.model_size).vocab_size
    fp8 = args.fp8_format
    cfg = get_config(
        args.model_size, image_size=args.image_size, class_token=args.class_token,
        register_tokens=args.register_tokens, decoder_noise_tau=args.decoder_noise_tau,
        pos_embed_type=args.position_embedding_type, pos_embed_ref_grid=args.pos_embed_ref_grid,
        vocab_size=vocab, lpips_weight=args.lpips_weight, lpips_path=args.lpips_path,
        pixel_l1_weight=args.pixel_l1_weight, latent_l1_weight=args.latent_l1_weight,
        reconstruction_weight=args.reconstruction_weight, caption_weight=args.caption_weight,
        contrastive_weight=args.contrastive_weight, pixel_loss_fraction=args.pixel_loss_fraction,
    )
    impl = LayerImplConfig(
        backend=args.transformer_impl, attention=args.attention_backend,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32, bf16=args.bf16, fp8=fp8,
        recompute_granularity=args.recompute_granularity, sequence_parallel=args.sequence_parallel,
        compile=args.torch_compile,
    )
    vae_kw = dict(scaling_factor=args.vae_scaling_factor, shift_factor=args.vae_shift_factor)
    vae = FrozenVAE.tiny(**vae_kw) if args.tiny_vae else FrozenVAE.from_pretrained(args.vae_path, **vae_kw)
    vae.configure_decode(VAEDecodeConfig(channels_last=args.vae_channels_last, autocast_bf16=args.vae_autocast_bf16,
                                         compile=args.vae_decode_compile, checkpoint=args.vae_decode_checkpoint))
    if args.data_path:
        check_latent_normalisation(args.data_path, vae, args.image_size)
    model = build_model(cfg, impl, vae=vae)
    model.to_frozen(device)
    for line in apply_converters(model, impl, device):  # around the model: torchao float8, torch.compile
        log0(line)
    if args.sequence_parallel:  # around the model: TP all-reduce of the sequence-sharded parameters' gradients
        log0(f"sequence parallelism: {install_grad_hooks(model)} parameters get a TP gradient all-reduce")
    if args.init_universal:  # into the bare model, before ZeRO partitions anything (works for every stage)
        check_init_compatible(cfg, args.init_universal)
        meta = universal.load_universal(model, args.init_universal, load_optimizer=False)
        log0(f"initialised weights from universal checkpoint {args.init_universal} ({meta.get('source', '')})")

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, total_iters))
    pipelined = args.pipeline_model_parallel_size > 1
    ds_config = {  # under pipelining the schedule accumulates micro-batches itself: one DeepSpeed "micro" step
        "train_micro_batch_size_per_gpu": plan.micro_batch_size * (plan.grad_accum if pipelined else 1),
        "gradient_accumulation_steps": 1 if pipelined else plan.grad_accum,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage,
                              # not under pipelining: megatron's schedule runs backward outside the engine,
                              # so DeepSpeed's reduce hooks would fire on every micro-batch
                              **({"overlap_comm": True, "contiguous_gradients": True}
                                 if args.overlap_grad_reduce and args.zero_stage in (1, 2) and not pipelined
                                 else {})},
        "bf16": {"enabled": bool(args.bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if args.overlap_grad_reduce and pipelined:
        log0("note: --overlap-grad-reduce is ignored under pipeline parallelism (gradients are reduced once, "
             "after the 1F1B schedule)")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config,
                                           mpu=MegatronMPU())

    iteration, consumed, data_state = 0, 0, None
    if args.load:
        iteration, consumed, data_state = _resume(engine, args.load, dp_size, dp_rank, args.zero_stage)
    elif args.finetune_from:
        _restore_weights(engine, args.finetune_from, args.zero_stage, keep_optimizer=args.keep_optimizer)
        pos = ("sincos position embeddings re-evaluated on the new grid" if cfg.pos_embed_type == "sincos" else
               f"learned {cfg.pos_embed_ref_grid}x{cfg.pos_embed_ref_grid} position table resized to the new grid")
        log0(f"stage start from {args.finetune_from} at {args.image_size}px ({pos}; optimizer "
             f"{'kept' if args.keep_optimizer else 'reset'})")

    if args.mock_data:
        data = MockData(args.image_size, cfg.vocab_size, plan.micro_batch_size, plan.grad_accum, dp_rank, dp_size,
                        cfg.text_context_length, cfg.caption_length, seed=args.seed,
                        state=data_state if data_state and "consumed" in data_state else {"consumed": consumed})
    else:
        data = DataIterator(
            DataConfig(data_path=args.data_path, tokenizer=args.tokenizer, micro_batch_size=plan.micro_batch_size,
                       image_size=args.image_size, data_weights=args.data_weights, resample=args.data_resample,
                       num_workers=args.num_workers, shuffle_buffer=args.shuffle_buffer, seed=args.seed,
                       text_length=cfg.text_context_length, caption_length=cfg.caption_length),
            dp_rank, dp_size, state=data_state if data_state and "raw_pos" in data_state else None)

    writer = _tensorboard(args)
    wandb_run = _wandb(args, cfg)
    flops = None
    signals = _Signals()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 empties p
    log0(f"OV3-{args.model_size} {args.image_size}px: {n_params:,} trainable params on this model-parallel rank | world {world} = "
         f"TP {args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x DP {dp_size} | "
         f"micro {plan.micro_batch_size} x accum {plan.grad_accum} x DP {dp_size} = global "
         f"{plan.global_batch_size} | ZeRO-{args.zero_stage} | {'bf16' if args.bf16 else 'fp32'}"
         f"{' fp8-' + fp8 if fp8 else ''} | layers: {resolve_backend(impl.backend)}/{impl.attention}"
         f"{' compiled' if impl.compile else ''} | {total_iters} iterations")

    sums: Dict[str, float] = {}
    n_logged, skipped_total, bad_streak = 0, 0, 0
    t_log = time.time()
    samples_since_log = 0
    engine.train()
    stop_reason = None
    own_grad_norm = args.zero_stage == 0 and not args.bf16  # DeepSpeed keeps no norm for a plain optimizer
    step_grad_norm = None
    latent_input = False  # latent shards (no VAE encode in the step): known from the first batch
    while iteration < total_iters:
        if pipelined:
            outs, finite = _pipeline_step(engine, data, device, plan)
            if finite:
                bad_streak = 0
            else:  # like a skipped micro-batch without pipelining: the data moves on, the iteration does not
                skipped_total += 1
                bad_streak += 1
                consumed += plan.global_batch_size
                log0(f"iteration {iteration + 1}: non-finite loss, step skipped ({bad_streak} in a row)")
                if bad_streak >= args.max_bad_steps:
                    stop_reason = (f"stopping: {bad_streak} consecutive non-finite losses "
                                   f"(--max-bad-steps {args.max_bad_steps}); lower --lr or check the data")
                    break
                continue
            for out in outs:
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_logged += 1
        done = 0
        while not pipelined and done < plan.grad_accum:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
            latent_input = "images" not in batch
            out = engine(batch)
            loss = out["total_loss"]
            finite = torch.tensor([1.0 if torch.isfinite(loss).item() else 0.0], device=device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                skipped_total += 1
                bad_streak += 1
                log0(f"iteration {iteration + 1}: non-finite loss on some rank, micro-batch skipped "
                     f"({bad_streak} in a row)")
                if bad_streak >= args.max_bad_steps:
                    stop_reason = (f"stopping: {bad_streak} consecutive non-finite losses "
                                   f"(--max-bad-steps {args.max_bad_steps}); lower --lr or check the data")
                    break
                continue
            bad_streak = 0
            engine.backward(loss)
            if own_grad_norm and engine.is_gradient_accumulation_boundary():
                step_grad_norm = _grad_norm(model)  # gradients are reduced over DP by now, not yet clipped
            engine.step()
            done += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_logged += 1
        if stop_reason:
            break
        iteration += 1
        consumed += plan.global_batch_size
        samples_since_log += plan.global_batch_size

        if iteration % args.log_interval == 0 or iteration == total_iters:
            if flops is None:
                flops = step_flops_per_sample(cfg, args.image_size, vae, encode_in_step=not latent_input,
                                              micro_batch=plan.micro_batch_size)
            vec = torch.tensor([sums.get(k, 0.0) for k in sorted(sums)] + [float(n_logged)], device=device,
                               dtype=torch.float64)
            dist.all_reduce(vec, group=ps.get_data_parallel_group())
            avg = {k: float(vec[i] / vec[-1]) for i, k in enumerate(sorted(sums))}
            dt = time.time() - t_log
            sps = samples_since_log / dt
            tflops = flops["total"] * sps / world / 1e12
            gn = engine.get_global_grad_norm()
            gn = step_grad_norm if gn is None else gn
            lr = sched.get_last_lr()[0]
            bad = _bad_counts_over_dp(data, device)
            losses = " | ".join(f"{k} {avg[k]:.4f}" for k in ("total_loss",) + LOSS_NAMES if k in avg)
            log0(f"iteration {iteration:6d}/{total_iters} | {losses} | acc i2t {avg.get('contrastive_acc_i2t', 0):.3f}"
                 f" | lr {lr:.3e} | grad norm {float(gn if gn is not None else float('nan')):.3f} | "
                 f"samples/s {sps:.1f} | TFLOP/s/device {tflops:.4f} | mem {memory_mb(device):.0f} MB | "
                 f"skipped steps {skipped_total} | bad samples {sum(bad.values())}"
                 + (f" {({k: v for k, v in bad.items() if v})}" if any(bad.values()) else ""))
            if writer is not None:
                for k, v in avg.items():
                    writer.add_scalar(f"train/{k}", v, iteration)
                for k, v in (("lr", lr), ("samples_per_s", sps), ("tflops_per_device", tflops),
                             ("grad_norm", float(gn or 0.0)), ("skipped_steps", skipped_total)):
                    writer.add_scalar(f"train/{k}", v, iteration)
                for k, v in bad.items():
                    writer.add_scalar(f"data/bad_{k}", v, iteration)
                writer.flush()
            mem_max = torch.tensor([memory_mb(device)], device=device)
            dist.all_reduce(mem_max, op=dist.ReduceOp.MAX)  # the most loaded rank (e.g. the last pipeline stage)
            if args.metrics_file and dist.get_rank() == 0:
                with open(args.metrics_file, "a") as f:
                    f.write(json.dumps({"iteration": iteration, **avg, "lr": lr, "grad_norm": float(gn or 0.0),
                                        "samples_per_s": sps, "tflops_per_device": tflops,
                                        "step_time_s": dt * plan.global_batch_size / samples_since_log,
                                        "memory_mb": memory_mb(device), "memory_mb_max_rank": float(mem_max),
                                        "bad_samples": bad,
                                        "skipped_steps": skipped_total}) + "\n")
            if wandb_run is not None:
                wandb_run.log({**{f"train/{k}": v for k, v in avg.items()}, "lr": lr, "samples_per_s": sps},
                              step=iteration)
            sums, n_logged, samples_since_log, t_log = {}, 0, 0, time.time()

        if args.eval_interval and iteration % args.eval_interval == 0:
            _evaluate(engine, args, cfg, iteration, device, writer)
        stop = signals.any_rank(device)
        exit_now = bool(args.exit_interval and iteration % args.exit_interval == 0 and iteration < total_iters)
        due = args.save and (
            (args.save_interval and iteration % args.save_interval == 0) or iteration == total_iters or stop or exit_now)
        if due:
            _save(engine, args, iteration, consumed, data, cfg)
        if stop or exit_now:
            log0(f"{'signal received' if stop else '--exit-interval reached'}: "
                 f"{'saved' if args.save else 'not saved (no --save)'} at iteration {iteration}, exiting")
            break

    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    if stop_reason:
        log0(stop_reason)
        return 1
    if args.save and ckpt.read_latest(args.save):
        log0(f"checkpoint: {os.path.abspath(os.path.join(args.save, ckpt.read_latest(args.save)))}")
    log0("training finished")
    return 0


def _grad_norm(model) -> float:
    """Global L2 norm of the gradients (what DeepSpeed reports for its other optimizers; ZeRO-0 in fp32 reports
    none): parameters replicated over tensor parallelism counted once, shards summed over the TP group."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.detach().double().pow(2).sum()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
    return float(sq.sqrt())


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


def _pipeline_step(engine, data, device, plan):
    """One iteration under pipeline parallelism: megatron-core's 1F1B schedule runs forward and backward of
    all ``grad_accum`` micro-batches over the stages; then DeepSpeed reduces the gradients over the
    data-parallel group and its (ZeRO-1) optimizer steps. Returns (per-micro-batch metrics on the last stage,
    all losses finite)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = engine.module
    cfg = model.cfg

    def forward_step(data_iterator, module):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        out = module(batch)
        if not module.post_process:
            return out, None
        # clone: megatron's schedule divides the returned loss by the number of micro-batches *in place*, and a
        # detached view would carry that division into the logged metrics
        return out["total_loss"], lambda loss: (loss, {k: v.detach().clone().float() for k, v in out.items()})

    seq = (cfg.image_size // cfg.pixels_per_token) ** 2 + cfg.num_prefix_tokens
    outs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=plan.grad_accum,
        seq_length=seq, micro_batch_size=plan.micro_batch_size, forward_only=False,
    )
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    ok = all(bool(torch.isfinite(o["total_loss"]).item()) for o in outs) if last else True
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() == 0:
        for p in model.parameters():
            p.grad = None
        return [], False
    engine.allreduce_gradients()
    engine.step()
    # metrics travel from the last stage to every rank of the pipeline group (rank 0 logs)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        holder = [[{k: float(v) for k, v in o.items()} for o in outs] if last else None]
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(holder, src=src, group=ps.get_pipeline_model_parallel_group())
        return holder[0], True
    return [{k: float(v) for k, v in o.items()} for o in outs], True


def _evaluate(engine, args, cfg, iteration, device, writer):
    """In-training evaluation on held-out shards (every data-parallel rank takes its share)."""
    from megatron.core import parallel_state as ps

    from ..eval.evaluate import evaluate, format_table, read_lines, save_grid

    if ps.get_pipeline_model_parallel_world_size() > 1:
        log0("note: in-training evaluation is skipped under pipeline parallelism; run tools/evaluate.py on a checkpoint")
        return
    data = DataIterator(DataConfig(data_path=args.eval_data_path, tokenizer=args.tokenizer, epochs=1, drop_last=False,
                                   micro_batch_size=args.micro_batch_size, image_size=args.image_size, num_workers=0,
                                   shuffle_buffer=0, seed=args.seed, text_length=cfg.text_context_length,
                                   caption_length=cfg.caption_length),
                        ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    classnames = read_lines(args.eval_classnames) if args.eval_classnames else None
    res = evaluate(engine.module, data, device, Tokenizer(args.tokenizer), classnames,
                   max_batches=args.eval_batches, group=ps.get_data_parallel_group())
    rep = res["report"]
    log0(f"evaluation at iteration {iteration}: " + " | ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rep.items()))
    if dist.get_rank() == 0:
        if writer is not None:
            for k, v in rep.items():
                writer.add_scalar(f"eval/{k}", v, iteration)
            if res["grid"] is not None:
                writer.add_image("eval/reconstructions", res["grid"], iteration)
            writer.flush()
        if args.save:
            os.makedirs(os.path.join(args.save, "eval"), exist_ok=True)
            if res["grid"] is not None:
                save_grid(res["grid"], os.path.join(args.save, "eval", f"grid_{iteration:07d}.png"))
            with open(os.path.join(args.save, "eval", f"report_{iteration:07d}.json"), "w") as f:
                json.dump(rep, f, indent=1)


def _layout(zero_stage: int) -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_stages": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size(), "zero_stage": zero_stage}


def _same_layout(directory: str, tag: str, zero_stage: int) -> bool:
    path = os.path.join(directory, tag, "universal", "meta.json")
    if not os.path.isfile(path):
        return True  # no universal copy: only the DeepSpeed files can be used
    meta = json.load(open(path))
    return all(meta.get(k) == v for k, v in _layout(zero_stage).items())


def _resume(engine, directory, dp_size, dp_rank, zero_stage):
    """Exact resume (DeepSpeed files) when the layout is unchanged; otherwise reshard from the universal copy."""
    tag = ckpt.read_latest(directory) if os.path.isdir(directory) else None
    if tag is None:
        raise FileNotFoundError(f"--load {directory!r} holds no checkpoint ('latest' missing)")
    if _same_layout(directory, tag, zero_stage):
        tag, client, rng = ckpt.load(engine, directory)
        if rng is not None:
            ckpt.set_rng_state(rng)
        how = "same layout"
    else:
        client = universal.load_universal(engine, os.path.join(directory, tag, "universal"))
        engine.lr_scheduler.load_state_dict(client["scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        how = (f"resharded from TP{client['tensor_parallel']} x PP{client['pipeline_stages']} x "
               f"DP{client['data_parallel']} ZeRO-{client['zero_stage']}")
    iteration, consumed = int(client.get("iteration", 0)), int(client.get("consumed_samples", 0))
    states = client.get("data_states") or []
    data_state = None
    if len(states) == dp_size:
        data_state = states[dp_rank]
    elif states and "consumed" in (states[0] or {}):
        data_state = {"consumed": consumed}  # mock data: the position is layout-independent
    else:
        log0(f"warning: checkpoint has data positions for {len(states)} data-parallel ranks, this run has "
             f"{dp_size}; the data stream restarts (resume is not exact)")
    log0(f"resumed from {os.path.join(directory, tag)} at iteration {iteration} ({consumed} samples; {how})")
    return iteration, consumed, data_state


def _restore_weights(engine, directory, zero_stage, keep_optimizer):
    tag = ckpt.read_latest(directory) if os.path.isdir(directory) else None
    if tag is None:
        raise FileNotFoundError(f"{directory!r} holds no checkpoint ('latest' missing)")
    if _same_layout(directory, tag, zero_stage):
        # a new stage keeps the weights (and, asked, Adam's moments), never the previous stage's schedule
        ckpt.load(engine, directory, module_only=not keep_optimizer, load_optimizer=keep_optimizer,
                  load_scheduler=False)
    else:
        universal.load_universal(engine, os.path.join(directory, tag, "universal"), load_optimizer=keep_optimizer)
    # the loaded optimizer state carries the previous stage's learning rates: start this stage's schedule
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


def _save(engine, args, iteration, consumed, data, cfg):
    from megatron.core import parallel_state as ps

    states = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, data.state_dict(), group=ps.get_data_parallel_group())
    client = {"iteration": iteration, "consumed_samples": consumed, "data_states": states,
              "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    t = time.time()
    extra = None
    if args.zero_stage == 3 and not args.no_save_universal:
        log0("note: ZeRO-3 checkpoints get no universal copy (resume needs the same layout)")
    if not args.no_save_universal and args.zero_stage < 3:
        meta = dict(client, optimizer_step=iteration, scheduler=engine.lr_scheduler.state_dict(),
                    model_config=cfg.to_dict(), vae={"tiny": bool(args.tiny_vae), "path": args.vae_path,
                             "scaling_factor": args.vae_scaling_factor, "shift_factor": args.vae_shift_factor},
                    **_layout(args.zero_stage))
        meta.pop("args")
        extra = lambda d: universal.save_universal(engine, d, meta)  # noqa: E731
    tag = ckpt.save(engine, args.save, iteration, client, cfg.to_dict(), args.keep_last, extra=extra)
    log0(f"saved checkpoint {os.path.join(args.save, tag)} in {time.time() - t:.1f}s")


def _tensorboard(args):
    if not args.tensorboard_dir or dist.get_rank() != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(args.tensorboard_dir)


def _wandb(args, cfg):
    if not args.wandb_project or dist.get_rank() != 0:
        return None
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb-project needs wandb: pip install -e .[wandb]") from None
    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(project=args.wandb_project, config={"model": cfg.to_dict(), "args": vars(args)})
