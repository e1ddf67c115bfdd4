"""`PretrainConfig`: every knob of self-supervised pretraining (re-exported as `common.pretrain.PretrainConfig`).

Kept apart from the loop, like `common.train_config`, so that `medimaging --help` reads the
defaults without importing torch. The method is SimSiam (Chen & He, CVPR 2021): two augmented
views of each image, a projector and a predictor head, negative cosine similarity with a
stop-gradient. It needs no negatives, no momentum encoder and no large batch, so the same knobs
serve a 2-core CPU (batch 32-64, a few epochs) and a GPU on all of NIH (batch 256+, 100+ epochs).
Defaults follow the paper where it applies, except the optimiser: AdamW with a short warmup learns
several times faster than the paper's SGD in the ~100 steps a CPU affords (`optimizer="sgd"`,
`lr=0.05`, `weight_decay=1e-4` is the paper's recipe, for long GPU runs). The augmentations are
chest X-ray ones (no left-right flip: the heart is on the left, and Cardiomegaly is about it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.train_config import fields_from_dict
from common.weights import Weights

OPTIMIZERS = ("sgd", "adamw")


PRETRAIN_JSON = "pretrain.json"  # a pretraining run's summary, written last (its run is finished when it exists)

@dataclass
class PretrainConfig:
    """The whole configuration of one pretraining run (saved as config.json["pretrain"] and in last.pt)."""

    # --- data ---
    data: list[str] = field(default_factory=list)  # folders; every image file below each is used, labels or not; empty: the folders `medimaging train` would use
    # --- model ---
    model_name: str = "resnet18"  # any timm.list_models() name; fine-tune with the same --model
    in_chans: int = 1  # 1 = one-channel stem (radiographs are grey); 3 = grey repeated; fine-tuning adapts either
    image_size: int = 128  # square input side in pixels; the decoded-image cache is shared with `medimaging train` at this size
    pretrained: bool | str = False  # start from these weights (e.g. ImageNet's, then adapt in-domain); any `common.weights.Weights` spelling
    proj_dim: int = 2048  # projector output width (the paper's 2048)
    pred_dim: int = 512  # predictor bottleneck width (the paper's 512: a bottleneck keeps the predictor from being the identity)
    # --- optimisation ---
    epochs: int = 20  # passes over all images (the paper: 100-800; a CPU budget: a handful)
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs); None: no limit
    batch_size: int = 64  # images per step per process (each gives two views); >= 2, BatchNorm needs a batch
    optimizer: str = "adamw"  # 'adamw': measured to learn several times faster in a CPU budget of ~100 steps; 'sgd': the paper's (momentum 0.9; use lr 0.05, weight_decay 1e-4)
    lr: float = 0.004  # base learning rate per 256 images: the step's lr is lr * batch_size * processes / 256 (the paper's rule)
    weight_decay: float = 0.01  # AdamW: decoupled, on matrices and kernels only; SGD: on every weight (the paper's 1e-4)
    warmup_steps: int = 50  # linear warmup in optimiser steps, at most 20% of the run
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * this
    fix_pred_lr: bool = True  # the predictor keeps the peak lr (the paper: it adapts to the changing features)
    # --- two views (torch ops on the uint8 batch, on the device) ---
    crop_scale: tuple[float, float] = (0.3, 1.0)  # random resized crop: fraction of the image's area kept
    rotate_degrees: float = 10.0  # random rotation of each view, +- degrees (patients are not always straight)
    hflip: bool = False  # random left-right flip; off: the heart's side is information
    intensity_strength: float = 1.0  # gamma, contrast, brightness per view (`common.augment.random_intensity_batch`; 1: gamma 2^+-0.5, contrast 0.6-1.4, brightness +-0.2): exposure and detector curves differ between sites
    blur_prob: float = 0.5  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # its sigma in pixels at 224 px, scaled with image_size
    # --- system ---
    seed: int = 49  # init, data order and augmentation
    num_workers: int = 2  # DataLoader workers (uint8 batches from the memory-mapped cache are cheap)
    device: str = "auto"  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # channels_last memory format on CUDA
    checkpoint_every: int = 200  # also write checkpoints/last.pt every N steps (0: end of each epoch only)
    progress: bool = True  # tqdm progress bars (rank 0 only)
    out: str = ""  # the run directory (required); rerunning with the same out resumes

    def __post_init__(self) -> None:
        self.pretrained = Weights.parse(self.pretrained).config_value()

    @property
    def weights(self) -> Weights:
        return Weights.parse(self.pretrained)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Build from a plain dict (e.g. config.json["pretrain"]); unknown keys are an error."""
        return cls(**fields_from_dict(cls, d, tuples=("crop_scale", "blur_sigma")))

    def asdict(self) -> dict[str, Any]:
        """A JSON-able dict; `PretrainConfig.from_dict(c.asdict()) == c`. Pairs are lists, as JSON reads them back."""
        d = dataclasses.asdict(self)
        d["data"] = [str(p) for p in self.data]
        d["crop_scale"], d["blur_sigma"] = list(self.crop_scale), list(self.blur_sigma)
        d["pretrained"] = self.weights.config_value()
        return d

    def validate(self) -> PretrainConfig:
        """Raise ValueError naming the bad fields; return self."""
        problems = []
        if not self.out:
            problems.append("out: the run directory is required (e.g. out='runs/pretrain')")
        if self.in_chans not in (1, 3):
            problems.append(f"in_chans={self.in_chans}: expected 1 or 3")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r}: expected one of {list(OPTIMIZERS)}")
        for name in ("epochs", "image_size", "proj_dim", "pred_dim"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if int(self.batch_size) < 2:
            problems.append(f"batch_size={self.batch_size}: must be >= 2 (BatchNorm needs more than one image)")
        for name in ("warmup_steps", "num_workers", "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name}={getattr(self, name)}: must be >= 0")
        if self.max_steps is not None and int(self.max_steps) < 1:
            problems.append(f"max_steps={self.max_steps}: must be >= 1 (or None)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr}: must be > 0")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            problems.append(f"crop_scale={self.crop_scale}: expected 0 < low <= high <= 1")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            problems.append(f"blur_sigma={self.blur_sigma}: expected 0 < low <= high")
        if not 0 <= self.blur_prob <= 1:
            problems.append(f"blur_prob={self.blur_prob}: expected a probability in [0, 1]")
        for name in ("intensity_strength", "rotate_degrees"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: must be >= 0")
        if self.intensity_strength > 2:
            problems.append(f"intensity_strength={self.intensity_strength}: at most 2 (beyond, contrast inverts images)")
        if problems:
            raise ValueError("PretrainConfig: " + "; ".join(problems))
        return self
