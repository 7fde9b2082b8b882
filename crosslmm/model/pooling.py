"""Parameter-free reduction of each frame's ViT patch grid to the LLM's g x g tokens.

The paper pools *before* the projector (LLaVA-OneVision pools after it); this module is
applied to vision features of width Dv. See method.md, "Initial token merge".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_frames(
    features: torch.Tensor,  # (F, N, Dv) with N = grid * grid, row-major
    grid_size: int,
    pooled_grid_size: int,
    mode: str = "bilinear",
    antialias: bool = True,
) -> torch.Tensor:
    """Return (F, g*g, Dv): each frame's grid resampled to g x g, row-major."""
    num_frames, num_tokens, dim = features.shape
    if num_tokens != grid_size * grid_size:
        raise ValueError(f"expected {grid_size}x{grid_size}={grid_size * grid_size} tokens per frame, got {num_tokens}")
    if pooled_grid_size == grid_size:
        return features
    grid = features.transpose(1, 2).reshape(num_frames, dim, grid_size, grid_size)
    size = (pooled_grid_size, pooled_grid_size)
    if mode == "average":
        pooled = F.adaptive_avg_pool2d(grid, size)
    elif mode == "bilinear":
        # CPU has no antialiased bilinear kernel for half types: compute in float32.
        upcast = antialias and grid.device.type == "cpu" and grid.dtype in (torch.bfloat16, torch.float16)
        pooled = F.interpolate(grid.float() if upcast else grid, size=size, mode="bilinear", align_corners=False, antialias=antialias)
        pooled = pooled.to(features.dtype)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; expected 'bilinear' or 'average'")
    return pooled.flatten(2).transpose(1, 2)
