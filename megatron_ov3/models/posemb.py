"""Fixed sincos-2d position embeddings (MAE / big_vision ``posemb_sincos_2d``), resolution-agnostic."""
from __future__ import annotations

import torch


def sincos_2d(width: int, grid: int, ref_grid: int, temperature: float = 10000.0,
              device=None, dtype=torch.float32) -> torch.Tensor:
    """(grid*grid, width) embedding, row-major over (y, x).

    Positions are ``arange(grid) * ref_grid / grid``: at ``grid == ref_grid`` this is the standard integer
    sincos table; other grids sample the same continuous function, i.e. the table is interpolated, so a
    128px stage (8x8 tokens) and a 256px stage (16x16) see the same spatial frequencies over the image.
    """
    if width % 4:
        raise ValueError(f"sincos-2d position embedding needs width divisible by 4, got {width}")
    pos = torch.arange(grid, device=device, dtype=torch.float64) * (ref_grid / grid)
    y, x = torch.meshgrid(pos, pos, indexing="ij")
    omega = torch.arange(width // 4, device=device, dtype=torch.float64) / (width // 4 - 1 if width > 4 else 1)
    omega = 1.0 / (temperature ** omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    emb = torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1)
    return emb.to(dtype)
