#!/usr/bin/env python
"""Plot every loss of a metrics file (--metrics-file of training) against the iteration into one PNG."""
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import MissingFile, Parser, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--metrics-file", required=True, help="JSON lines written by training's --metrics-file")
    p.add_argument("--output", required=True, help="PNG to write (e.g. curves.png)")
    p.add_argument("--title", default="OV3 training")
    args = p.parse_args(argv)
    if not os.path.isfile(args.metrics_file):
        raise MissingFile(f"--metrics-file {args.metrics_file!r} does not exist")
    from megatron_ov3.eval.curves import plot_curves
    from megatron_ov3.records import read_jsonl

    keys = plot_curves(read_jsonl(args.metrics_file), args.output, args.title)
    print(f"wrote {args.output} ({', '.join(keys)})")
    return 0


if __name__ == "__main__":
    exit_with(main)
