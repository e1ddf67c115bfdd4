"""Batch augmentation on the tensor: geometric (rotation, zoom, shift) and intensity (brightness,
contrast, gamma).

`BatchTransform` (common.train_data) applies both to the single grey channel before normalisation:
`random_affine_batch` first, then `random_intensity_batch`. Radiographs differ between machines and
exposures in exactly these ways, and a small pool of training images shows only a few of them.
There is deliberately no left-right flip: the heart's side is part of what a chest X-ray model
should learn.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_affine_batch", "random_intensity_batch"]


def random_intensity_batch(x: torch.Tensor, generator: torch.Generator, strength: float = 0.5) -> torch.Tensor:
    """Random gamma, contrast and brightness per image of a float [B, C, H, W] batch in [0, 1].

    strength 1 draws gamma in [2^-0.5, 2^0.5], contrast in [0.6, 1.4] (about each image's mean) and
    brightness in [-0.2, 0.2]; smaller strengths shrink all three ranges; 0 returns `x` unchanged.
    The result is clipped to [0, 1]; the same generator state gives the same output.
    """
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise TypeError(f"random_intensity_batch needs a float [B, C, H, W] tensor, got {tuple(x.shape)} {x.dtype}")
    b = x.shape[0]
    if b == 0 or strength <= 0:
        return x
    u = torch.rand(b, 3, generator=generator, device=generator.device, dtype=torch.float32).to(x.device, x.dtype)
    u = (u * 2 - 1) * strength  # each in [-strength, strength]
    gamma = torch.pow(2.0, 0.5 * u[:, 0]).view(b, 1, 1, 1)
    contrast = (1 + 0.4 * u[:, 1]).view(b, 1, 1, 1)
    brightness = (0.2 * u[:, 2]).view(b, 1, 1, 1)
    x = x.clamp(0, 1).pow(gamma)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp_(0, 1)


def random_affine_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 20.0,
    scale: tuple[float, float] = (0.9, 1.1),
    translate: float = 0.05,
    fill: float = 0.0,
) -> torch.Tensor:
    """Random rotation (±degrees), zoom and shift of each image of a float [B, C, H, W] batch.

    One sampling grid + grid_sample for the whole batch; the same generator state gives the same
    output. Apply it to images scaled to [0, 1] before normalisation: uncovered corners get
    `fill` (0 = black, as the original study's torchvision rotation did).
    """
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise TypeError(f"random_affine_batch needs a float [B, C, H, W] tensor, got {tuple(x.shape)} {x.dtype}")
    b, _, h, w = x.shape
    if b == 0:
        return x
    dev = generator.device
    u = torch.rand(b, 4, generator=generator, device=dev, dtype=torch.float32).to(x.device)
    angle = torch.deg2rad((u[:, 0] * 2 - 1) * degrees)
    zoom = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx = (u[:, 2] * 2 - 1) * translate * 2  # fraction of the width → normalised [-1, 1] units
    ty = (u[:, 3] * 2 - 1) * translate * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos, -sin * h / w, tx], dim=1),  # h/w, w/h: rotate in pixels, not in [-1, 1]^2
        torch.stack([sin * w / h, cos, ty], dim=1),
    ], dim=1).to(x.dtype)
    # the sampling grid as two broadcast multiply-adds per batch: F.affine_grid's batched matmul
    # over every pixel costs ~3x more on CPU and gives the same grid (align_corners=False)
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    t = theta.view(b, 2, 3, 1, 1)
    grid = torch.empty(b, h, w, 2, device=x.device, dtype=x.dtype)
    torch.add(t[:, 0, 0] * xs.view(1, 1, w), t[:, 0, 1] * ys.view(1, h, 1) + t[:, 0, 2], out=grid[..., 0])
    torch.add(t[:, 1, 0] * xs.view(1, 1, w), t[:, 1, 1] * ys.view(1, h, 1) + t[:, 1, 2], out=grid[..., 1])
    out = F.grid_sample(x - fill if fill else x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill if fill else out
