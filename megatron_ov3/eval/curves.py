"""Training curves from a metrics file (``--metrics-file``, the schema of :mod:`megatron_ov3.training.metrics`):
every loss against the iteration, one panel each, as a PNG a person looks at."""
from __future__ import annotations

from typing import List, Sequence

from ..records import RECORD_KEYS


def loss_keys(records: Sequence[dict]) -> List[str]:
    """The model's losses in the records (``*_loss`` and the reconstruction terms), in a stable order."""
    keys = [k for k in records[0] if k not in RECORD_KEYS and k != "iteration"
            and isinstance(records[0][k], (int, float))]
    return [k for k in keys if k.endswith("_loss") or k.endswith("_l1") or k == "lpips"]


def plot_curves(records: Sequence[dict], path: str, title: str = "OV3 training") -> List[str]:
    """Write ``path`` (PNG) with one panel per loss; returns the plotted keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("the metrics file holds no record")
    keys = loss_keys(records)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    its = [r["iteration"] for r in records]
    for ax, key in zip(axes.flat, keys):
        ax.plot(its, [r[key] for r in records], marker=".", linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return keys
