"""The optimisation recipe `common.train.fit` follows (re-exported there): the loss masked where a
label is unknown, AdamW's parameter groups, the warmup + cosine learning-rate schedule, and the
positive weights of rare labels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["masked_bce", "training_loss", "mixup", "param_groups", "positive_weights", "WarmupCosine"]


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None,
               smoothing: float = 0.0, focal_gamma: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the known (non-NaN) targets only.

    A NaN target contributes nothing, not even gradient: an image labelled only for Cardiomegaly
    teaches only the Cardiomegaly output. `smoothing` s moves targets to t(1 - s) + s/2;
    `focal_gamma` > 0 weights each term by (1 - p_t)^gamma (focal loss, Lin et al. 2017), so the
    many easy negatives of a rare finding weigh less than its hard cases.
    """
    known = ~torch.isnan(targets)
    t = torch.where(known, targets, torch.zeros_like(targets))
    if smoothing:
        t = t * (1.0 - smoothing) + 0.5 * smoothing
    logits = logits.float()
    if not focal_gamma:
        loss = F.binary_cross_entropy_with_logits(logits, t, weight=known.float(), pos_weight=pos_weight,
                                                  reduction="sum")
        return loss / known.sum().clamp(min=1)
    terms = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * t + (1 - p) * (1 - t)
    loss = (terms * (1 - p_t).pow(focal_gamma) * known).sum()
    return loss / known.sum().clamp(min=1)


FOCAL_GAMMA = 2.0  # TrainConfig.loss == "focal"


def training_loss(cfg, logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """The loss a run minimises per micro-batch, as its `TrainConfig` (loss, label_smoothing) says."""
    return masked_bce(logits, targets, pos_weight, smoothing=cfg.label_smoothing,
                      focal_gamma=FOCAL_GAMMA if cfg.loss == "focal" else 0.0)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) of a batch with a shuffled copy of itself, drawn from `seed`.

    Targets mix like the images; a label unknown (NaN) in either image stays unknown, so the mask
    of `masked_bce` still holds.
    """
    if alpha <= 0 or len(inputs) < 2:
        return inputs, targets
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(inputs))).to(inputs.device)
    mixed = lam * inputs + (1 - lam) * inputs[perm]
    return mixed, lam * targets + (1 - lam) * targets[perm]  # NaN + anything stays NaN


class WarmupCosine:
    """Learning-rate multiplier per optimiser step: linear warmup, then cosine decay to `min_ratio`."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {"name": "warmup_cosine", "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_ratio": self.min_ratio}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: weight decay on matrices and kernels only."""
    # biases and norm scales are not regularised (nanoGPT)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def positive_weights(y: np.ndarray) -> np.ndarray:
    """Per-label BCE weight of positives: neg/pos on `y` (1 / 0 / NaN), within [1e-3, 1000]."""
    pos = np.nansum(y == 1, axis=0).astype(np.float64)
    neg = np.nansum(y == 0, axis=0).astype(np.float64)
    # neg/pos, capped so a label with one positive cannot dominate the loss
    return np.clip(neg / np.maximum(pos, 1.0), 1e-3, 1000.0).astype(np.float32)
