"""`TrainConfig`: every training knob, one named field each (re-exported as `common.train.TrainConfig`).

Kept apart from the loop so that `medimaging --help` and the trainer files can read the defaults
without importing torch. Defaults are the original study's where that makes sense (see
SEED-NOTES.md); where the study's choice is a known weakness (Adam without a schedule, an image
split instead of a patient split) the default is the field's usual practice and the comment says so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.labels import TASKS
from common.weights import Weights

HEADS = ("mlp", "linear")
LOSSES = ("bce", "focal")  # masked binary cross-entropy; focal loss (gamma 2) on the same mask


# How the suite trains from random initialisation on real radiographs (a few hundred to a few
# thousand images, a CPU): chosen by patient-wise 5-fold cross-validation on the NIH sample
# (`python bench/bench_recipe.py`, the table in bench/results/recipe_search.md). `medimaging train`
# and the quick profile use these values on real data without pretrained weights
# (`recipe_defaults`); any field given explicitly wins. The study's defaults (the dataclass below)
# are for pretrained backbones, where 5 epochs suffice.
SMALL_DATA_RECIPE: dict[str, Any] = {  # bench/bench_recipe.py's "r18-30ep-combo"
    "model_name": "resnet18", "in_chans": 1, "image_size": 64, "epochs": 30, "batch_size": 32, "lr": 1e-3,
    "warmup_steps": 50, "patience": 0, "keep_best": False, "ema": 0.998, "intensity": 0.5, "zoom": 0.15,
    "translate": 0.08,
}
# Knobs added after runs were first cached and checkpointed, with the value that computes exactly
# what runs did before the knob existed: such a knob enters a run's cache key only when set to
# something else, and a checkpoint saved without it resumes as if it had this value.
ADDED_KNOBS: dict[str, Any] = {
    "folds": 0, "fold": 0, "zoom": 0.1, "translate": 0.05, "intensity": 0.0, "loss": "bce",
    "label_smoothing": 0.0, "mixup": 0.0, "ema": 0.0, "keep_best": True,
}
RECIPES = ("auto", "small-data", "study")  # auto: small-data on real data without pretrained weights


def uses_small_data_recipe(recipe: str, data: list[str], pretrained: Any = False) -> bool:
    """Whether `recipe` ("auto", "small-data", "study") means the small-data recipe for these data
    folders and weights: "auto" does when every folder is real (no SYNTHETIC marker; no folder
    given means dataset_full/ and dataset_cardiomegaly/ when they hold data) and the backbone
    starts from random weights."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: expected one of {list(RECIPES)}")
    if recipe != "auto":
        return recipe == "small-data"
    from pathlib import Path

    from common.paths import DATASET_CARDIOMEGALY, DATASET_FULL, SYNTHETIC_MARKER, find_data_dir, has_data

    folders = [Path(d) for d in data] or [p for p in (find_data_dir(DATASET_FULL), find_data_dir(DATASET_CARDIOMEGALY))
                                          if has_data(p)]
    real = bool(folders) and not any((f / SYNTHETIC_MARKER).is_file() for f in folders)
    return real and Weights.parse(pretrained).is_random


def recipe_defaults(recipe: str, data: list[str], pretrained: Any = False) -> dict[str, Any]:
    """The TrainConfig fields a recipe sets (empty for the study's defaults)."""
    return dict(SMALL_DATA_RECIPE) if uses_small_data_recipe(recipe, data, pretrained) else {}


def fields_from_dict(cls, d: dict[str, Any], tuples: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dataclass's keyword arguments from a plain dict (config.json): an unknown key is an
    error naming the known ones, `data` becomes a list of strings and each `tuples` field a tuple
    of floats (JSON reads tuples back as lists). `TrainConfig.from_dict`, `PretrainConfig.from_dict`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    d = dict(d)
    if "data" in d:
        d["data"] = [str(p) for p in (d["data"] or [])]
    for name in tuples:
        if name in d:
            d[name] = tuple(float(v) for v in d[name])
    return d


@dataclass
class TrainConfig:
    """The whole configuration of one training run (saved as config.json["train"] and in last.pt)."""

    # --- data ---
    data: list[str] = field(default_factory=list)  # dataset folders, any layout common.data reads; empty: dataset_full/ + dataset_cardiomegaly/, else the synthetic default
    task: str = "all14"  # 'cardiomegaly' = stage 1 (one output), 'all14' = stage 2 (14 outputs, NaN-masked)
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train/dev/test by patient (the study split images 6/7 : 1/7, leaking patients)
    folds: int = 0  # K >= 2: patient-wise K-fold cross-validation, fold `fold` is the test split (official lists ignored) and dev is split_fractions' dev share of the rest; 0: split by split_fractions
    fold: int = 0  # which of the `folds` folds is the test split (0 .. folds-1)
    # --- model ---
    model_name: str = "tf_efficientnet_b4.ns_jft_in1k"  # any timm.list_models() name; the study's B4 Noisy Student
    head: str = "mlp"  # 'mlp' = the study's 2-hidden-layer head, 'linear' = one Linear layer
    head_dropout: float = 0.3  # dropout inside the MLP head (the study's 0.3)
    pretrained: bool | str = False  # True/"hub": timm hub weights (needs internet); a path/URL: local weights; False/"none": random init (far below published results). "xrv:NAME": torchxrayvision's chest X-ray weights, which set model_name, in_chans=1 and (when left at its default) image_size. Any `common.weights.Weights` spelling; stored as Weights.config_value()
    init_from: str | None = None  # run dir or checkpoint whose backbone starts this run (stage 1 -> stage 2, "medical pretraining"); head is new
    freeze: int = 0  # freeze the first K backbone stages/blocks (0 none, -1 whole backbone: head only)
    in_chans: int = 3  # 3 = grey repeated to RGB as the study did; 1 = one-channel stem
    image_size: int = 224  # square input side in pixels (the study's 224)
    # --- optimisation ---
    epochs: int = 5  # passes over the train split (the study's 5)
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs); None: no limit, 0: evaluate the initial weights only
    batch_size: int = 16  # images per micro-batch per process (the study's 16)
    grad_accum: int = 1  # micro-batches per optimiser step: effective batch = batch_size * grad_accum * processes
    lr: float = 5e-4  # peak AdamW learning rate (the study's 5e-4, with Adam and no schedule)
    min_lr_ratio: float = 0.01  # cosine decay ends at lr * this
    weight_decay: float = 0.01  # AdamW decoupled weight decay on weight matrices/kernels (not biases or norms)
    warmup_steps: int = 100  # linear warmup in optimiser steps; capped at 20% of the run so short runs still reach the peak lr
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off, as in the study)
    pos_weight: bool = False  # weight positives by neg/pos train prevalence per label (helps rare findings' recall)
    augment: bool = True  # random affine on train batches (the study rotated by up to 20 degrees)
    rotate_degrees: float = 20.0  # max rotation of the augmentation, degrees (the study's 20)
    zoom: float = 0.1  # random zoom of the augmentation in [1 - zoom, 1 + zoom]
    translate: float = 0.05  # random shift of the augmentation, fraction of the side
    intensity: float = 0.0  # random brightness, contrast and gamma of strength 0..1 (0: off); never a left-right flip (the heart's side matters)
    loss: str = "bce"  # 'bce' masked binary cross-entropy, 'focal' the same with focal weighting (gamma 2)
    label_smoothing: float = 0.0  # targets become t * (1 - s) + s / 2
    mixup: float = 0.0  # mixup Beta(alpha, alpha) of train batches (0: off); a label unknown in either image stays unknown
    ema: float = 0.0  # exponential moving average of the weights with this decay, scored and kept instead of the raw weights (0: off)
    patience: int = 3  # stop after this many epochs without a better dev score (0: never stop early)
    keep_best: bool = True  # keep the epoch with the best dev score; False: keep the last epoch (a dev split of a few dozen images picks its best epoch mostly by chance)
    # --- evaluation ---
    eval_batch_size: int = 64  # images per batch when predicting dev/test (no gradients, so larger)
    n_boot: int = 1000  # bootstrap resamples for the test AUROC 95% intervals
    # --- system ---
    seed: int = 49  # split, init, data order and augmentation (the study's split seed 49)
    num_workers: int = 2  # DataLoader workers; uint8 batches from the memory-mapped cache are cheap (the study used 1)
    device: str = "auto"  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU, where it is slower)
    channels_last: bool = True  # channels_last memory format on CUDA (faster convolutions)
    checkpoint_every: int = 500  # also write checkpoints/last.pt every N optimiser steps (0: end of each epoch only)
    progress: bool = True  # tqdm progress bars (rank 0 only)
    out: str = ""  # the run directory (required); rerunning with the same out resumes from checkpoints/last.pt

    def __post_init__(self) -> None:
        # one spelling per source (False / True / the path or URL), as config.json and run keys hold it
        weights = Weights.parse(self.pretrained)
        self.pretrained = weights.config_value()
        conv = weights.convention
        if conv is not None:
            # weights with their own input convention (torchxrayvision's) decide the architecture and the
            # channels, and the size unless another than the default was asked for
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            if self.model_name == defaults["model_name"]:
                self.model_name = conv.model_name
            if self.image_size == defaults["image_size"]:
                self.image_size = conv.image_size
            self.in_chans = conv.in_chans

    @property
    def weights(self) -> Weights:
        """Where the backbone's starting weights come from (`pretrained` as a typed value)."""
        return Weights.parse(self.pretrained)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (e.g. config.json["train"]); unknown keys are an error."""
        return cls(**fields_from_dict(cls, d, tuples=("split_fractions",)))

    def asdict(self) -> dict[str, Any]:
        """A JSON-able dict; `TrainConfig.from_dict(c.asdict()) == c`."""
        d = dataclasses.asdict(self)
        d["data"] = [str(p) for p in self.data]
        d["pretrained"] = self.weights.config_value()
        return d

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field; return self."""
        problems = []
        if not self.out:
            problems.append("out: the run directory is required (e.g. out='runs/stage1')")
        if self.task not in TASKS:
            problems.append(f"task={self.task!r}: expected one of {sorted(TASKS)}")
        if self.head not in HEADS:
            problems.append(f"head={self.head!r}: expected one of {list(HEADS)}")
        for name in ("epochs", "batch_size", "grad_accum", "image_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("warmup_steps", "patience", "num_workers", "checkpoint_every", "n_boot"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name}={getattr(self, name)}: must be >= 0")
        if self.max_steps is not None and self.max_steps < 0:
            problems.append(f"max_steps={self.max_steps}: must be >= 0 (or None for no limit)")
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r}: expected one of {list(LOSSES)}")
        if self.folds == 1 or self.folds < 0:
            problems.append(f"folds={self.folds}: expected 0 (no cross-validation) or K >= 2")
        if self.folds and not 0 <= self.fold < self.folds:
            problems.append(f"fold={self.fold}: expected 0 .. {self.folds - 1} for folds={self.folds}")
        for name in ("zoom", "translate", "intensity", "label_smoothing"):
            if not 0 <= float(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)}: expected a number in [0, 1)")
        if self.mixup < 0:
            problems.append(f"mixup={self.mixup}: must be >= 0 (0: off)")
        if not 0 <= self.ema < 1:
            problems.append(f"ema={self.ema}: expected a decay in [0, 1) (0: off)")
        conv = self.weights.convention
        if conv is not None and self.model_name.split(".", 1)[0] != conv.model_name:
            problems.append(f"model_name={self.model_name!r}: pretrained={self.pretrained!r} are weights of a "
                            f"{conv.model_name} (leave the model name out, or give {conv.model_name!r})")
        if self.in_chans not in (1, 3):
            problems.append(f"in_chans={self.in_chans}: expected 1 or 3")
        if self.lr <= 0:
            problems.append(f"lr={self.lr}: must be > 0")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            problems.append(f"split_fractions={self.split_fractions}: expected three non-negative numbers summing to 1")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))
        return self
