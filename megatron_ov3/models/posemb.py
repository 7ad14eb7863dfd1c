"""Position embeddings: fixed sincos-2d (MAE / big_vision ``posemb_sincos_2d``), resolution-agnostic, and the
resizing of a learned table to another grid (open_clip ``resize_pos_embed``)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def sincos_2d(width: int, grid: int, ref_grid: int, temperature: float = 10000.0,
              device=None, dtype=torch.float32) -> torch.Tensor:
    """(grid*grid, width) embedding, row-major over (y, x); computed once per arguments and cached (it was
    recomputed in fp64 at every forward): treat the result as read-only.

    Positions are ``arange(grid) * ref_grid / grid``: at ``grid == ref_grid`` this is the standard integer
    sincos table; other grids sample the same continuous function, i.e. the table is interpolated, so a
    128px stage (8x8 tokens) and a 256px stage (16x16) see the same spatial frequencies over the image.
    """
    if width % 4:
        raise ValueError(f"sincos-2d position embedding needs width divisible by 4, got {width}")
    device = torch.empty(0).device if device is None else torch.device(device)  # None: the default (meta too)
    return _sincos_cached(width, grid, ref_grid, float(temperature), device, dtype)


@functools.lru_cache(maxsize=64)
def _sincos_cached(width: int, grid: int, ref_grid: int, temperature: float, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    pos = torch.arange(grid, dtype=torch.float64, device="cpu") * (ref_grid / grid)  # on the CPU, whatever the
    y, x = torch.meshgrid(pos, pos, indexing="ij")                                    # default device
    omega = torch.arange(width // 4, dtype=torch.float64, device="cpu") / (width // 4 - 1 if width > 4 else 1)
    omega = 1.0 / (temperature ** omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    emb = torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1)
    return emb.to(device=device, dtype=dtype)


def resize_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(g*g, W) row-major table -> (grid*grid, W): identity at the same grid, else bicubic with antialiasing and
    ``align_corners=False``, computed in float32 - what open_clip's ``resize_pos_embed`` does when it resizes a
    checkpoint's ``positional_embedding`` to a new image size."""
    g = int(round(table.shape[0] ** 0.5))
    if g * g != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows, not a square grid")
    if g == grid:
        return table
    img = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return img.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)
