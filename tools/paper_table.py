#!/usr/bin/env python
"""The paper's table from several tools/evaluate.py reports: a row for the frozen VAE alone (from the first
report), then one row per OV3 checkpoint; columns rFID, PSNR, SSIM, LPIPS, zero-shot top-1, retrieval R@1/5.

  python tools/paper_table.py eval-B/report.json eval-L/report.json --names OV3-B/2 OV3-L/2 > table.md
"""
import json
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with
from megatron_ov3.errors import MissingFile


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="report.json files of tools/evaluate.py (or their folders)")
    p.add_argument("--names", nargs="+", default=None, help="row names (default: the reports' folder names)")
    args = p.parse_args(argv)
    from megatron_ov3.eval.summary import paper_table

    if args.names and len(args.names) != len(args.reports):
        raise UsageError(f"--names gives {len(args.names)} names for {len(args.reports)} reports")
    rows = []
    for i, path in enumerate(args.reports):
        path = os.path.join(path, "report.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise MissingFile(f"report {path!r} not found; give tools/evaluate.py's report.json")
        try:
            rep = json.load(open(path))
            rep["num_images"]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{path!r} is not a tools/evaluate.py report.json") from None
        rows.append((args.names[i] if args.names else os.path.basename(os.path.dirname(os.path.abspath(path))), rep))
    print(paper_table(rows))


if __name__ == "__main__":
    exit_with(main)
