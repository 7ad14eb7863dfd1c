#!/usr/bin/env python
"""Markdown tables (for the README's performance section) from tools/benchmark.py --json reports.

  python tools/bench_table.py runs/bench/*.json > table.md"""
import json

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("reports", nargs="+", help="JSON files written by tools/benchmark.py --json")
    args = p.parse_args(argv)
    from megatron_ov3.perf.benchmark import format_markdown

    reps = []
    for path in args.reports:
        try:
            with open(path) as f:
                rep = json.load(f)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not JSON ({e.msg}); give the files tools/benchmark.py --json wrote")
        if not isinstance(rep, dict) or not {"config", "results", "ratios", "versions"} <= set(rep):
            raise UsageError(f"{path} is not a tools/benchmark.py report (no config/results/ratios); "
                             "give the files tools/benchmark.py --json wrote")
        reps.append(rep)
    print(format_markdown(reps))
    return 0


if __name__ == "__main__":
    exit_with(main)
