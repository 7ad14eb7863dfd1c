"""Tables and PNG plots of scaling plans."""
from __future__ import annotations

import os
from typing import Dict, List


def _layout_str(l: dict) -> str:
    return (f"TP{l['tp']} PP{l['pp']} DP{l['dp']} ZeRO-{l['zero']} mb{l['micro_batch']}x{l['grad_accum']} "
            f"rc:{l['recompute']}")


def table(rows: List[dict]) -> str:
    lines = ["| nodes | GPUs | global batch | recommended layout | img/s | img/s/GPU | scaling eff. | mem GB/GPU |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    base = None
    for r in rows:
        if not r["best"]:
            lines.append(f"| {r['nodes']} | {r['gpus']} | {r['global_batch']} | nothing fits | | | | |")
            continue
        b = r["best"][0]
        per = b["samples_per_s"] / r["gpus"]
        base = base or per
        lines.append(f"| {r['nodes']} | {r['gpus']} | {r['global_batch']} | {_layout_str(b['layout'])} | "
                     f"{b['samples_per_s']:,.0f} | {per:.1f} | {per / base:.2f} | {b['memory_gb']['total']:.1f} |")
    return "\n".join(lines)


def plot_plan(plans: Dict[str, List[dict]], out_dir: str, hw) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for size, rows in plans.items():
        pts = [(r["nodes"], r["best"][0]["samples_per_s"], r["gpus"]) for r in rows if r["best"]]
        if not pts:
            continue
        n, sps, g = zip(*pts)
        per = [s / gg for s, gg in zip(sps, g)]
        axes[0].loglog(n, sps, "o-", label=f"OV3-{size}")
        axes[1].semilogx(n, [p / per[0] for p in per], "o-", label=f"OV3-{size}")
    axes[0].set(xlabel="nodes", ylabel="images/s", title=f"throughput ({hw.name})")
    axes[1].set(xlabel="nodes", ylabel="per-GPU throughput vs smallest", title="scaling efficiency")
    for a in axes:
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "throughput.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = []
    for size, rows in plans.items():
        r = next((r for r in rows if r["best"]), None)
        if r is None:
            continue
        m = r["best"][0]["memory_gb"]
        left = 0.0
        for k in ("params", "grads", "optimizer", "activations"):
            ax.barh(f"OV3-{size} @{r['nodes']} nodes", m[k], left=left, label=k if not labels else None)
            left += m[k]
        labels.append(size)
    ax.axvline(hw.hbm_gb, color="k", ls="--", lw=1)
    ax.set(xlabel="GB per GPU", title="memory per GPU of the recommended layout")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "memory.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
