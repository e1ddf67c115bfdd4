"""SimSiam (Chen & He 2021), the method `common.pretrain` trains, and the two views it compares.

    z = projector(backbone(view))        3-layer MLP with BatchNorm, proj_dim wide
    p = predictor(z)                     bottleneck MLP, pred_dim wide
    loss = -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2        in [-1, 1]; sg = stop-gradient

`spread` is the collapse check (z_std: ~1 spread, 0 collapsed); `backbone_state` the weights a
MedImagingModel loads; `TwoViews` makes both augmented views on the device from a uint8 batch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.augment import random_intensity_batch
from common.pretrain_config import PretrainConfig

__all__ = ["SimSiam", "simsiam_loss", "spread", "backbone_state", "TwoViews", "BACKBONE_PREFIX"]

BACKBONE_PREFIX = "backbone."  # MedImagingModel's name for its backbone: what init_from strips


class SimSiam(nn.Module):
    """A backbone (pooled features) with SimSiam's projector and predictor heads.

    `backbone` is a `MedImagingModel`'s, so this module's `backbone.*` weights have the names a
    MedImagingModel of the same build gives them.
    """

    def __init__(self, backbone: nn.Module, num_features: int, proj_dim: int = 2048, pred_dim: int = 512):
        super().__init__()
        self.backbone = backbone
        # the paper's projector: 3 layers, BatchNorm on each output, the last one without affine
        self.projector = nn.Sequential(
            nn.Linear(num_features, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, proj_dim),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Two views [B, C, H, W] -> (p1, p2, z1, z2); the z are detached (the stop-gradient)."""
        b = len(x1)
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # one pass: twice the batch for the convolutions
        p = self.predictor(z)
        return p[:b], p[b:], z[:b].detach(), z[b:].detach()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine similarity, in [-1, 1] (the z are already detached)."""
    return -(F.cosine_similarity(p1.float(), z2.float(), dim=-1).mean()
             + F.cosine_similarity(p2.float(), z1.float(), dim=-1).mean()) / 2


def spread(z: torch.Tensor) -> torch.Tensor:
    """std over the batch of the L2-normalised projections, averaged over dimensions, times sqrt(dim):
    ~1 for well spread outputs, 0 for a collapsed (constant) one."""
    zn = F.normalize(z.float(), dim=1)
    return zn.std(dim=0).mean() * math.sqrt(z.shape[1])


def backbone_state(model: SimSiam) -> dict[str, torch.Tensor]:
    """The backbone's weights under MedImagingModel's names (`backbone.*`): best.safetensors."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}



class TwoViews:
    """uint8 [B, 1, S, S] batch -> two normalised float views [B, C, S, S] on the device.

    Every random number comes from the given CPU generator, so a view is a function of its seed.
    The intensity changes work on [0, 1] values before normalisation, as `BatchTransform` does.
    """

    def __init__(self, cfg: PretrainConfig, input_cfg: dict, device: torch.device, channels_last: bool = False):
        c = int(input_cfg["in_chans"])
        mean = np.resize(np.asarray(input_cfg["mean"], dtype=np.float32)[:c], c)
        std = np.resize(np.asarray(input_cfg["std"], dtype=np.float32)[:c], c)
        self.cfg = cfg
        self.in_chans = c
        self.mean = torch.from_numpy(mean).view(1, c, 1, 1).to(device)
        self.std = torch.from_numpy(std).view(1, c, 1, 1).to(device)
        self.device = device
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        return self.view(x, generator), self.view(x, generator)

    def view(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One random view of a [B, 1, S, S] batch in [0, 1]."""
        x = self._intensity(self._blur(self._geometry(x, g), g), g)
        x = x.expand(-1, self.in_chans, -1, -1)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _rand(self, g: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float32).to(self.device)

    def _geometry(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random resized crop (area fraction in crop_scale, aspect 3/4..4/3), rotation and optional
        flip, as one affine sampling grid; area outside the image is black."""
        cfg, b = self.cfg, len(x)
        u = self._rand(g, b, 6)
        lo, hi = cfg.crop_scale
        area = lo + u[:, 0] * (hi - lo)
        ratio = torch.exp((u[:, 1] * 2 - 1) * math.log(4 / 3))
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # half-width in [-1, 1] units = fraction of the side
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (u[:, 2] * 2 - 1) * (1 - w)
        cy = (u[:, 3] * 2 - 1) * (1 - h)
        angle = torch.deg2rad((u[:, 4] * 2 - 1) * cfg.rotate_degrees)
        flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones_like(w)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([w * cos * flip, -w * sin, cx], 1),
                             torch.stack([h * sin * flip, h * cos, cy], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _blur(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A separable Gaussian blur with a sigma per image (blur_prob of them; the rest unchanged)."""
        cfg, b, size = self.cfg, len(x), x.shape[-1]
        u = self._rand(g, b, 2)
        if cfg.blur_prob <= 0:
            return x
        scale = size / 224.0
        lo, hi = cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale
        sigma = lo + u[:, 0] * (hi - lo)
        radius = max(1, math.ceil(3 * hi))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)
        delta = (t == 0).to(x.dtype).expand(b, -1)
        k = torch.where((u[:, 1] < cfg.blur_prob)[:, None], k, delta)  # [B, K]
        y = x.transpose(0, 1)  # [1, B, S, S]: one group per image
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b, 1, 1, -1), groups=b)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b, 1, -1, 1), groups=b)
        return y.transpose(0, 1)

    def _intensity(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Gamma, contrast around the image's mean, brightness: the training recipe's own augmentation."""
        return random_intensity_batch(x, g, strength=self.cfg.intensity_strength)
