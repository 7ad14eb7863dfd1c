#!/usr/bin/env python
"""Plan OV3 training layouts across node counts: memory per GPU and step time of every TP x PP x DP x ZeRO x
micro-batch x recompute layout, keep what fits, rank by throughput; table, JSON and PNG plots."""
import json
import os

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
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--output", default=None, help="folder for plan.json and PNG plots")
    args = p.parse_args(argv)
    from megatron_ov3.scaling.planner import Hardware, plan
    from megatron_ov3.scaling.report import plot_plan, table

    hw = Hardware.from_yaml(args.hardware) if args.hardware else Hardware()
    if any(n < 1 for n in args.nodes):
        raise UsageError("--nodes must be >= 1")
    result = {}
    for size in args.model_size:
        rows = plan(size, args.nodes, hw, args.image_size, args.global_batch_size, args.per_gpu_batch, args.mode,
                    fp8=args.fp8, top=args.top)
        result[size] = rows
        print(f"\nOV3-{size}, {args.image_size}px, {args.mode} scaling, {hw.name}:")
        print(table(rows))
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "plan.json"), "w") as f:
            json.dump({"hardware": hw.__dict__, "mode": args.mode, "plans": result}, f, indent=1)
        for path in plot_plan(result, args.output, hw):
            print(f"wrote {path}")


if __name__ == "__main__":
    exit_with(main)
