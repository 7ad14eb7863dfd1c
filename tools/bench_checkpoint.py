#!/usr/bin/env python
"""What a checkpoint save costs the training job, per method, measured in one run (launch it like training):

    deepspeed --num_gpus 2 tools/bench_checkpoint.py --model-size S --mock-data --tiny-vae --no-bf16 \\
        --zero-stage 1 --micro-batch-size 4 --global-batch-size 8 --bench-dir /tmp/ckbench

Methods, each timed from a barrier before to a barrier after (the stall every rank sees), after one training step:
  native        DeepSpeed's ``engine.save_checkpoint`` alone
  ov3           what training does: DeepSpeed's files + universal index + sealed manifest + atomic publish
  ov3+universal the same with ``--save-universal`` (rank 0 converts right after the save)
  eager-gather  the previous design: a universal copy gathered from the engine at every save (one writer/stage)
Per method: stall (s), time until sealed and published on disk (in the background for ov3), bytes written per
rank (``/proc/self/io`` wchar: max and rank 0), peak-RSS growth per rank (peak reset before each method), and
the stall relative to native.
"""
import json
import os
import shutil
import sys
import time

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, exit_with


def _io_and_memory(field: str):
    """(bytes this process has written, its VmRSS or VmHWM in bytes)."""
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    mem = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
    return int(io["wchar"]), mem * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS (Linux)
        f.write("5")


def _methods(tr, meta):
    from megatron_ov3.checkpointing import deepspeed_io, universal

    def native(d):
        tr.engine.save_checkpoint(d, tag="iter_0000001", client_state=tr.state_dict(), save_latest=False)

    def ov3(d, eager=False):
        tr.job.checkpoint.save, tr.job.checkpoint.save_universal = d, eager
        tr.save()

    def gather(d):
        deepspeed_io.save(tr.engine, d, tr.state.iteration, tr.state_dict(), {}, extra=lambda p:
                          universal.save_universal(tr.engine, p, meta))

    return {"native": native, "ov3": ov3, "ov3+universal": lambda d: ov3(d, True), "eager-gather": gather}


def _measure(fn, folder):
    import torch.distributed as dist

    from megatron_ov3.checkpointing import format as fmt

    dist.barrier()
    _reset_peak_rss()
    w0, h0 = _io_and_memory("VmRSS")
    t = time.perf_counter()
    fn(folder)
    dist.barrier()
    stall = time.perf_counter() - t
    fmt.wait_for_publish()  # sealed and published in the background (training would go on meanwhile)
    dist.barrier()
    done = time.perf_counter() - t
    w1, h1 = _io_and_memory("VmHWM")
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (stall, w1 - w0, h1 - h0, done))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    dist.barrier()
    return {"stall_s": max(r[0] for r in rows), "on_disk_s": max(r[3] for r in rows), "bytes_rank0": rows[0][1],
            "bytes_max_rank": max(r[1] for r in rows),
            "rss_growth_max_rank": max(r[2] for r in rows), "bytes_on_disk": size}


def main(argv=None):
    import torch.distributed as dist

    from megatron_ov3.checkpointing.restore import current_layout
    from megatron_ov3.training import trainer as T

    bench = Parser(description=__doc__, add_help=False,
                                    epilog="All other flags are training's: python -m megatron_ov3.pretrain --help")
    bench.add_argument("--bench-dir", required=True, help="scratch folder for the checkpoints (emptied per method)")
    bench.add_argument("--bench-repeats", type=int, default=2, help="saves per method; the best is reported")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        bench.print_help()
        return 0
    args, rest = bench.parse_known_args(argv)
    from megatron_ov3.config.job import parse_job, world_size

    job, _ = parse_job(rest)
    tr = T.setup(job, world_size())
    tr.engine.train()
    tr.train_step()  # optimizer states exist
    meta = dict(tr.state_dict(), model_config=tr.model.cfg.to_dict(), **current_layout(tr.job.parallel.zero_stage))
    results = {}
    for name, fn in _methods(tr, meta).items():
        runs = []
        for i in range(args.bench_repeats):
            folder = os.path.join(args.bench_dir, f"{name}-{i}")
            if dist.get_rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)
            runs.append(_measure(fn, folder))
            if dist.get_rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)
        results[name] = {k: (min if k.endswith("_s") else max)(r[k] for r in runs) for k in runs[0]}
    for r in results.values():
        r["stall_vs_native"] = r["stall_s"] / results["native"]["stall_s"]
    if dist.get_rank() == 0:
        _report(results, tr, args.json)
    return 0


def _report(results, tr, as_json):
    from megatron_ov3.models.accounting import count_parameters

    head = {"world": tr.world, "params": count_parameters(tr.model.cfg)["total"], **tr.job.parallel.__dict__}
    if as_json:
        print(json.dumps({"setup": head, "results": results}))
        return
    print(f"{head['params']:,} parameters, world {tr.world}, ZeRO-{tr.job.parallel.zero_stage}")
    print(f"{'method':15s} {'stall s':>8s} {'x native':>8s} {'sealed s':>8s} {'GB rank0':>9s} {'GB max rank':>11s} "
          f"{'RSS+ GB':>8s} {'GB on disk':>10s}")
    for name, r in results.items():
        print(f"{name:15s} {r['stall_s']:8.2f} {r['stall_vs_native']:8.2f} {r['on_disk_s']:8.2f} "
              f"{r['bytes_rank0'] / 1e9:9.3f} {r['bytes_max_rank'] / 1e9:11.3f} {r['rss_growth_max_rank'] / 1e9:8.3f} "
              f"{r['bytes_on_disk'] / 1e9:10.3f}")


if __name__ == "__main__":
    exit_with(main)
