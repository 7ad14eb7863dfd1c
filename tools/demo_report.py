#!/usr/bin/env python
"""The demo's closing report (``make demo``): losses, the VAE's reconstruction next to OV3's, retrieval and
zero-shot with chance levels, and the paths of grid.png and curves.png (written here from the metrics file)."""
import json
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import MissingFile, Parser, exit_with


def _json(path):
    if not os.path.isfile(path):
        raise MissingFile(f"{path} does not exist; run the demo's earlier steps first")
    return json.load(open(path))


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--demo-dir", required=True, help="the demo's output folder (DEMO_DIR, default runs/demo)")
    args = p.parse_args(argv)
    from megatron_ov3.eval.curves import plot_curves
    from megatron_ov3.eval.summary import summarize
    from megatron_ov3.records import read_jsonl

    d = args.demo_dir
    metrics = read_jsonl(os.path.join(d, "metrics.jsonl"))
    curves, grid = os.path.join(d, "curves.png"), os.path.join(d, "eval-trained", "grid.png")
    plot_curves(metrics, curves, "OV3 demo: losses")
    fit = os.path.join(d, "vae", "fit_vae.json")
    text = summarize(metrics, _json(os.path.join(d, "eval-trained", "report.json")),
                     _json(os.path.join(d, "eval-untrained", "report.json")),
                     _json(fit) if os.path.isfile(fit) else None,
                     [f"{os.path.abspath(grid)}  (rows: input | VAE alone | OV3)", os.path.abspath(curves)])
    print(text)
    with open(os.path.join(d, "summary.txt"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
