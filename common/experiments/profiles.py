"""Profiles and knobs: how big every training of the suite is, and the knobs experiments share.

Profiles scale the study's settings: `quick` (small real variants of each named backbone at 64 px,
random initialisation, a few epochs: the whole suite in about 20 minutes on a 2-core CPU), `paper`
(the study's settings: the named backbones at 224 px with timm's hub weights, 5 epochs, batch 16,
lr 5e-4; for a GPU and the full dataset) and `smoke` (timm's tiny test models, two optimiser steps
per training: tests). `Knobs` is the one typed value every experiment function takes; trainer files
and notebooks spell the same knobs as capitalised names (`KNOBS`).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.weights import HUB, RANDOM, Weights

STUDY_MODEL = "tf_efficientnet_b4.ns_jft_in1k"  # the study's tf_efficientnet_b4_ns, timm's current name
STUDY_VIT = "vit_base_patch16_224.augreg_in21k_ft_in1k"  # a ViT-B/16 as in the study's transformer variant

# What the original study reported (SEED-NOTES.md), shown next to ours where it reported something.
STUDY = {
    "stage1_accuracy": 83.95,  # Cardiomegaly vs No Finding, the hackathon leaderboard's test set
    "stage2_dev_mean_accuracy": 91.82,  # mean of 14 per-label dev accuracies, stage 2 from stage 1
    "stage2_without_stage1_dev_mean_accuracy": 87.61,  # the same without stage 1
    "cardiomegaly_after_stage2_accuracy": 81.96,  # the stage-2 model on stage 1's test set
}

# The backbone ablation: (row name, timm name as the field uses it). The study named VGG, ResNet,
# DarkNet and ViT "all below EfficientNet" without numbers; DenseNet-121 is CheXNet's backbone.
BACKBONES: tuple[tuple[str, str], ...] = (
    ("VGG-16", "vgg16_bn"),
    ("ResNet-50", "resnet50"),
    ("DenseNet-121 (CheXNet)", "densenet121"),
    ("CSPDarkNet-53", "cspdarknet53"),
    ("EfficientNet-B0", "efficientnet_b0"),
    ("EfficientNet-B4 (the study's)", STUDY_MODEL),
    ("ViT-B/16", STUDY_VIT),
    ("ConvNeXt-T", "convnext_tiny"),
)

# quick: a small real variant of each named backbone, so the whole suite fits a 2-core CPU.
# Names not listed here are trained as given (a ModelName you chose is what you get).
QUICK_MODELS: dict[str, str] = {
    STUDY_MODEL: "efficientnet_b0",
    "tf_efficientnet_b4_ns": "efficientnet_b0",
    "efficientnet_b0": "efficientnet_b0",
    STUDY_VIT: "vit_tiny_patch16_224",
    # timm's smallest VGG (vgg11_bn) carries a 4096-wide 7x7 classifier block of 102M weights that
    # alone trains at ~10 images/s on 2 cores; RepVGG-A0 is the VGG-style plain 3x3 stack at 8M.
    "vgg16_bn": "repvgg_a0",
    "resnet50": "resnet18",
    "densenet121": "densenet121",
    "cspdarknet53": "cs3darknet_s",
    "convnext_tiny": "convnext_atto",
}

# smoke: timm's tiny test models (code path only; the numbers mean nothing). Transformers get a
# tiny ViT, every other backbone the tiny EfficientNet, so the smoke suite shares runs and stays fast.
_SMOKE_FAMILIES = (("vit", "test_vit"), ("deit", "test_vit"), ("beit", "test_vit"), ("eva", "test_vit"))
_SMOKE_DEFAULT = "test_efficientnet"


@dataclass(frozen=True)
class Profile:
    """How big every training of the suite is."""

    name: str
    description: str
    image_size: int  # input side in pixels
    epochs: int
    max_steps: int | None  # optimiser steps per training (None: all epochs)
    batch_size: int
    lr: float
    warmup_steps: int
    # where backbones trained from scratch get their weights (`common.weights.Weights`): random
    # initialisation, timm's hub (needs internet) or a folder of downloaded weights, one per model.
    # `get_profile(weights=...)` overrides it (`medimaging reproduce --weights`, $MEDIMAGING_WEIGHTS).
    weights: Weights
    patience: int  # early stopping on dev mean AUROC
    n_boot: int  # bootstrap resamples for the AUROC 95% intervals
    num_workers: int  # DataLoader workers
    models: Mapping[str, str] = field(default_factory=dict)  # named backbone -> what this profile trains
    smoke: bool = False
    pretrain_epochs: int = 10  # self-supervised pretraining (the init comparison): passes over all images
    # torch CPU threads while this profile trains (None: torch's default). Tiny models gain nothing
    # from a second thread and lose much to OpenMP's spin-waiting on a busy machine.
    threads: int | None = None

    def pretrained_for(self, model_name: str) -> bool | str:
        """`TrainConfig.pretrained` for a backbone this profile trains from scratch (FileNotFoundError
        when a folder of downloaded weights has none for it)."""
        return self.weights.for_model(model_name).config_value()

    @property
    def label(self) -> str:
        """How tables name the profile: its settings and where the weights came from."""
        return f"{self.name} ({self.description}; {self.weights.describe()})"

    def model_for(self, name: str) -> str:
        """The timm model this profile trains for a named backbone."""
        if self.smoke:
            low = name.lower()
            if low.startswith("test_"):
                return name
            for prefix, tiny in _SMOKE_FAMILIES:
                if prefix in low:
                    return tiny
            return _SMOKE_DEFAULT
        return self.models.get(name, name)


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        "quick", "small real variants at 64 px, 4 epochs (2-core CPU)",
        image_size=64, epochs=4, max_steps=None, batch_size=32, lr=1e-3, warmup_steps=20, weights=Weights(RANDOM),
        patience=0, n_boot=500, num_workers=0, models=QUICK_MODELS,
    ),
    "paper": Profile(
        "paper", "the study's settings: named backbones at 224 px, 5 epochs, batch 16, lr 5e-4",
        image_size=224, epochs=5, max_steps=None, batch_size=16, lr=5e-4, warmup_steps=100, weights=Weights(HUB),
        patience=3, n_boot=1000, num_workers=4, pretrain_epochs=100,
    ),
    "smoke": Profile(
        "smoke", "timm's tiny test models at 32 px, two optimiser steps per training (tests only)",
        image_size=32, epochs=1, max_steps=2, batch_size=8, lr=1e-3, warmup_steps=0, weights=Weights(RANDOM),
        patience=0, n_boot=20, num_workers=0, smoke=True, threads=1, pretrain_epochs=1,
    ),
}


# What `medimaging reproduce --profile` offers: the smoke profile is its own flag (--smoke).
REPRODUCE_PROFILES = tuple(name for name, prof in PROFILES.items() if not prof.smoke)

WEIGHTS_ENV = "MEDIMAGING_WEIGHTS"


def check_weights(weights: str | Path) -> str:
    """"hub", "none" or an existing folder (made absolute); anything else is a clear error."""
    text = str(weights)
    if text.lower() in ("hub", "none"):
        return text.lower()
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise ValueError(f"weights {text!r}: expected 'hub' (timm's hub, needs internet), 'none' (random "
                         f"initialisation) or a folder of downloaded weights, one per model (NAME.safetensors "
                         f"or NAME/); {folder} is not a folder")
    return str(folder.resolve())


def get_profile(name: str | Profile = "quick", smoke: bool = False, weights: str | Path | None = None) -> Profile:
    """A profile by name; `smoke=True` gives the smoke profile whatever the name.

    weights: "hub", "none" or a folder of downloaded weights, overriding the profile's default for
    every backbone trained from scratch; None reads $MEDIMAGING_WEIGHTS (what `medimaging reproduce
    --weights` sets for the notebooks). The smoke profile's tiny test models have no weights: it
    ignores both.
    """
    if isinstance(name, Profile):
        prof = PROFILES["smoke"] if smoke else name
    elif smoke:
        prof = PROFILES["smoke"]
    elif name not in PROFILES:
        raise ValueError(f"profile {name!r}: expected one of {list(PROFILES)}")
    else:
        prof = PROFILES[name]
    weights = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
    if prof.smoke or weights is None:
        return prof
    return dataclasses.replace(prof, weights=Weights.parse(check_weights(weights)))


# ------------------------------------------------------------------------------------- knobs
# Trainer-file / notebook knob names -> keyword arguments of the experiment functions.
KNOBS = {
    "ModelName": "model_name", "Profile": "profile", "Smoke": "smoke", "DataFull": "data_full",
    "DataCardiomegaly": "data_cardiomegaly", "ImageSize": "image_size", "Epochs": "epochs",
    "BatchSize": "batch_size", "LearningRate": "lr", "Head": "head", "Seed": "seed", "RunsDir": "runs_dir",
    "WithoutStage1": "without_stage1", "FreezeEarly": "freeze_early", "Backbones": "backbones",
    "PretrainEpochs": "pretrain_epochs",
}


def knobs_of(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer file's knobs: its module-level names that start with a capital letter.

        knobs = experiments.knobs_of(globals())   # in the trainer's run(), read when it runs
    """
    knobs = {k: v for k, v in namespace.items() if k[:1].isupper()}
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown:
        raise TypeError(f"knob(s) {unknown} have no experiment argument; known: {sorted(KNOBS)}")
    return knobs


def knobs_to_kwargs(knobs: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge a trainer file's knobs with overrides (None keeps the knob) into keyword arguments."""
    merged = dict(knobs)
    for name, value in (overrides or {}).items():
        if name not in knobs:
            raise TypeError(f"unknown knob {name!r}; this experiment's knobs are {sorted(knobs)}")
        if value is not None:
            merged[name] = value
    unknown = [k for k in merged if k not in KNOBS]
    if unknown:
        raise TypeError(f"knob(s) {unknown} have no experiment argument; known: {sorted(KNOBS)}")
    return {KNOBS[k]: v for k, v in merged.items()}



@dataclass(frozen=True)
class Knobs:
    """The knobs every experiment shares, as one typed value (None: the profile's value).

        single_task("resnet50", profile="quick", epochs=2)          # keywords build the Knobs
        single_task("resnet50", Knobs(profile="quick", epochs=2))    # or pass one
    """

    profile: str | Profile = "quick"  # "quick" | "paper" | "smoke", or a Profile
    smoke: bool = False  # True: the smoke profile whatever `profile` says (tests)
    data_full: str | Path | None = None  # the 14-label folder; None: dataset_full/ or the synthetic default
    data_cardiomegaly: str | Path | None = None  # the Cardiomegaly vs No Finding folder; None: dataset_cardiomegaly/
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    head: str = "mlp"  # "mlp": the study's 2-hidden-layer head; "linear"
    seed: int = 49  # patient split, initialisation and data order (the study's split seed)
    runs_dir: str | Path | None = None  # the run cache; None: $MEDIMAGING_RUNS, else the cache folder's runs/

    @classmethod
    def of(cls, knobs: Knobs | None = None, **overrides: Any) -> Knobs:
        """`knobs` (default: all defaults) with keyword overrides; an unknown keyword is a TypeError."""
        base = knobs if knobs is not None else cls()
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown knob(s) {unknown}; the shared knobs are {[f.name for f in dataclasses.fields(cls)]}")
        return dataclasses.replace(base, **overrides)


# Per profile: the backbones of the table (row names or timm names of common.experiments.BACKBONES),
# pruning levels (unstructured, then channel-structured), the student and its input side.
COMPRESSION_PLANS: dict[str, dict[str, Any]] = {
    "paper": {"backbones": ("ResNet-50", "DenseNet-121 (CheXNet)", "EfficientNet-B0", "mobilenetv3_large_100"),
              "sparsities": (0.3, 0.5, 0.7), "structured": (0.3,), "student_image_size": 160},
    # quick: DenseNet-121 is the slowest to train on a CPU; its int8 ratios are in the 224 px table
    "quick": {"backbones": ("ResNet-50", "EfficientNet-B0", "mobilenetv3_large_100"),
              "sparsities": (0.5,), "structured": (0.3,), "student_image_size": 48},
    "smoke": {"backbones": ("EfficientNet-B0",), "sparsities": (0.5,), "structured": (), "student_image_size": 24},
}


def compression_plan(profile: Profile) -> dict[str, Any]:
    """The compression experiment's plan for a profile (`COMPRESSION_PLANS`)."""
    return COMPRESSION_PLANS["smoke" if profile.smoke else profile.name]
