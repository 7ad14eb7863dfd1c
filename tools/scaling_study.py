#!/usr/bin/env python
"""Plan OV3 training layouts across node counts: memory per GPU and step time of every TP x PP x DP x ZeRO x
micro-batch x recompute layout, keep what fits, rank by throughput; table, JSON and PNG plots.

Measured mode (--measure N[:tpT][:ppP][:zeroZ][:mbM] ...): launch real training runs through the DeepSpeed
launcher (CPU gloo processes, or GPUs/nodes with --hostfile), read step time and peak memory from their
metrics files and put them next to the planner's prediction (table, measured.json, measured.png):

  python tools/scaling_study.py --model-size tiny --image-size 32 --global-batch-size 8 --measure 1 2 4 \
      --calibrate bench.json --output study/          # CPU: --train-flags defaults to '--mock-data --tiny-vae'
"""
import dataclasses
import json
import os
import shlex

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--model-size", nargs="+", default=["H"])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--hardware", default=None, help="YAML hardware profile (default: H100 SXM 80GB, 8 per node)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--mode", choices=["strong", "weak"], default="strong")
    p.add_argument("--global-batch-size", type=int, default=4096, help="strong scaling: fixed global batch")
    p.add_argument("--per-gpu-batch", type=int, default=16, help="weak scaling: global batch = this x GPUs")
    p.add_argument("--fp8-format", default=None, choices=["hybrid", "e4m3"],
                   help="plan with FP8 GEMMs (the training flag of the same name; the planner uses the FP8 peak)")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--output", default=None, help="folder for plan.json and PNG plots (new or empty, or an earlier "
                   "scaling_study output)")
    p.add_argument("--calibrate", default=None, help="tools/benchmark.py --json output: calibrate the hardware")
    m = p.add_argument_group("measured mode")
    m.add_argument("--measure", nargs="+", default=None, metavar="SPEC",
                   help="runs to launch: N[:tpT][:ppP][:zeroZ][:mbM], e.g. 1 2 4 4:tp2")
    m.add_argument("--measure-iters", type=int, default=4, help="timed iterations per run (after 1 warm-up)")
    m.add_argument("--train-flags", default="--mock-data --tiny-vae",
                   help="data/VAE flags passed to every run "
                        "(cluster: '--data-path ... --tokenizer ... --vae-path ...')")
    m.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for multi-node runs")
    m.add_argument("--master-port", type=int, default=29650)
    args = p.parse_args(argv)
    from megatron_ov3.scaling.planner import Hardware, plan
    from megatron_ov3.scaling.report import plot_plan, table

    if args.hardware and not os.path.isfile(args.hardware):
        raise UsageError(f"--hardware {args.hardware!r} does not exist; give a YAML hardware profile")
    hw = Hardware.from_yaml(args.hardware) if args.hardware else Hardware()
    if args.calibrate:
        from megatron_ov3.scaling.measure import calibrate

        if not os.path.isfile(args.calibrate):
            raise UsageError(f"--calibrate {args.calibrate!r} does not exist; write it with tools/benchmark.py --json")
        try:
            hw = calibrate(hw, json.load(open(args.calibrate)))
        except (KeyError, ValueError) as e:
            raise UsageError(f"--calibrate {args.calibrate!r} is not a tools/benchmark.py --json report ({e})")
        print(f"hardware calibrated from {args.calibrate}: peak {hw.peak_tflops_bf16:.3f} TFLOP/s, "
              f"efficiency {hw.efficiency:.3f}, VAE fraction {hw.vae_tflops_fraction:.3f}")
    if any(n < 1 for n in args.nodes):
        raise UsageError("--nodes must be >= 1")
    for flag, v in (("--global-batch-size", args.global_batch_size), ("--per-gpu-batch", args.per_gpu_batch),
                    ("--top", args.top), ("--image-size", args.image_size), ("--measure-iters", args.measure_iters)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    from megatron_ov3.outputs import check_claim

    out = args.output or ("scaling_measured" if args.measure else None)
    if out:
        check_claim(out, "scaling_study", "--output")  # refused before any work
    if args.measure:
        return _measure(args, hw)
    result = {}
    for size in args.model_size:
        rows = plan(size, args.nodes, hw, args.image_size, args.global_batch_size, args.per_gpu_batch, args.mode,
                    fp8=args.fp8_format is not None, top=args.top)
        result[size] = rows
        print(f"\nOV3-{size}, {args.image_size}px, {args.mode} scaling, {hw.name}:")
        print(table(rows))
    if args.output:
        from megatron_ov3.outputs import claim

        claim(args.output, "scaling_study", "--output")
        with open(os.path.join(args.output, "plan.json"), "w") as f:
            json.dump({"hardware": hw.__dict__, "mode": args.mode, "plans": result}, f, indent=1)
        for path in plot_plan(result, args.output, hw):
            print(f"wrote {path}")


def _measure(args, hw):
    from megatron_ov3.scaling.measure import RunSpec, measure_table, plot_measured, predicted, run_measured

    if len(args.model_size) != 1:
        raise UsageError("--measure takes one --model-size")
    if args.measure_iters < 1:
        raise UsageError("--measure-iters must be >= 1")
    size = args.model_size[0]
    if args.hostfile:  # the hosts of the hostfile set the node size (DeepSpeed's own hostfile parser)
        from megatron_ov3.scaling.measure import hostfile_slots

        slots = hostfile_slots(args.hostfile)
        hw = dataclasses.replace(hw, gpus_per_node=min(slots.values()))
        print(f"--hostfile {args.hostfile}: {len(slots)} hosts x {hw.gpus_per_node} processes")
    specs = []
    for text in args.measure:
        try:
            spec = RunSpec.parse(text)
            spec.layout(args.global_batch_size)
            if args.hostfile:
                spec.check_nodes(hw.gpus_per_node)
        except ValueError as e:
            raise UsageError(str(e))
        specs.append(spec)
    from megatron_ov3.outputs import claim

    out = args.output or "scaling_measured"
    claim(out, "scaling_study", "--output")
    rows = []
    for i, spec in enumerate(specs):
        print(f"running {spec.name} ...", flush=True)
        meas = run_measured(spec, size=size, image_size=args.image_size, global_batch=args.global_batch_size,
                            iters=args.measure_iters, out_dir=out, port=args.master_port + i,
                            train_flags=shlex.split(args.train_flags), hostfile=args.hostfile,
                            gpus_per_node=hw.gpus_per_node)
        flags = shlex.split(args.train_flags)  # the prediction assumes what the runs do
        pred = predicted(spec, size=size, image_size=args.image_size, global_batch=args.global_batch_size, hw=hw,
                         bf16="--bf16" in flags, vae="tiny" if "--tiny-vae" in flags else "flux")
        rows.append({"name": spec.name, "measured": meas, "predicted": pred})
    print(measure_table(rows))
    with open(os.path.join(out, "measured.json"), "w") as f:
        json.dump({"hardware": hw.__dict__, "model_size": size, "image_size": args.image_size,
                   "global_batch": args.global_batch_size, "runs": rows}, f, indent=1)
    print(f"wrote {os.path.join(out, 'measured.json')}")
    print(f"wrote {plot_measured(rows, out, f'OV3-{size} {args.image_size}px, global batch {args.global_batch_size}')}")
    return 0


if __name__ == "__main__":
    exit_with(main)
