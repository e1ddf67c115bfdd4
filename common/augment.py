"""Intensity augmentation of a training batch: brightness, contrast and gamma, batched on the tensor.

The geometric half (rotation, zoom, shift) is `common.cache.random_affine_batch`; `BatchTransform`
(common.train_data) applies both to the single grey channel before normalisation. Radiographs
differ between machines and exposures in exactly these three ways, and a small pool of training
images shows only a few of them. There is deliberately no left-right flip: the heart's side is
part of what a chest X-ray model should learn.
"""
from __future__ import annotations

import torch

__all__ = ["random_intensity_batch"]


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
