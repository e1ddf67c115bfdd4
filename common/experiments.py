"""The study's experiments as functions of a few knobs: profiles, cached runs, tables and plots.

The trainer files (`single-task/trainer.py`, ...) and the notebooks call these; nothing here is a
training loop (`common.train.fit`), a dataset (`common.data`) or a metric (`common.metrics`).

    exp = single_task(model_name="tf_efficientnet_b4.ns_jft_in1k", profile="quick")
    print(exp.report())          # markdown tables, SYNTHETIC in the titles when the data is
    exp.save("results")          # results/tables/single_task.json, collected by `medimaging reproduce`

Profiles scale the study's settings: `quick` (small real variants of each named backbone at 64 px,
random initialisation, a few epochs: the whole suite in about 20 minutes on a 2-core CPU), `paper`
(the study's settings: the named backbones at 224 px with timm's hub weights, 5 epochs, batch 16,
lr 5e-4; for a GPU and the full dataset) and `smoke` (timm's tiny test models, two optimiser steps
per training: tests).

Runs are cached: a run's folder is `RUNS/<task>-<model>-<key>`, where the key hashes its full
training configuration and the identity of its data (paths, layouts, image and patient counts,
label-file sizes and mtimes); stage 2's configuration names stage 1's folder, so it includes stage
1's key. A finished run (metrics.json present) is reused, so re-running after one notebook changed
retrains only what changed; an interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import runs as runfiles
from common.labels import CHEXNET_AUROC, CHEXNET_MEAN_AUROC, LABELS, NO_FINDING

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
    pretrained: bool  # by default, timm hub weights for the first stage (needs internet)
    patience: int  # early stopping on dev mean AUROC
    n_boot: int  # bootstrap resamples for the AUROC 95% intervals
    num_workers: int  # DataLoader workers
    models: Mapping[str, str] = field(default_factory=dict)  # named backbone -> what this profile trains
    smoke: bool = False
    # torch CPU threads while this profile trains (None: torch's default). Tiny models gain nothing
    # from a second thread and lose much to OpenMP's spin-waiting on a busy machine.
    threads: int | None = None
    # where first-stage backbones get their weights, overriding `pretrained`: "hub", "none" (random
    # initialisation) or a folder of downloaded weights (see `common.models.find_local_weights`).
    # Set by `get_profile(weights=...)`, i.e. `medimaging reproduce --weights` / $MEDIMAGING_WEIGHTS.
    weights: str | None = None

    def pretrained_for(self, model_name: str) -> bool | str:
        """`build_model(pretrained=...)` for a backbone this profile trains from scratch."""
        if self.weights is None:
            return self.pretrained
        if self.weights in ("hub", "none"):
            return self.weights == "hub"
        from common.models import find_local_weights

        return str(find_local_weights(self.weights, model_name))

    @property
    def weights_text(self) -> str:
        source = self.weights or ("hub" if self.pretrained else "none")
        return {"hub": "timm hub weights", "none": "random initialisation"}.get(source, f"pretrained weights from {source}")

    @property
    def label(self) -> str:
        """How tables name the profile: its settings and where the weights came from."""
        return f"{self.name} ({self.description}; {self.weights_text})"

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
        image_size=64, epochs=4, max_steps=None, batch_size=32, lr=1e-3, warmup_steps=20, pretrained=False,
        patience=0, n_boot=500, num_workers=0, models=QUICK_MODELS,
    ),
    "paper": Profile(
        "paper", "the study's settings: named backbones at 224 px, 5 epochs, batch 16, lr 5e-4",
        image_size=224, epochs=5, max_steps=None, batch_size=16, lr=5e-4, warmup_steps=100, pretrained=True,
        patience=3, n_boot=1000, num_workers=4,
    ),
    "smoke": Profile(
        "smoke", "timm's tiny test models at 32 px, two optimiser steps per training (tests only)",
        image_size=32, epochs=1, max_steps=2, batch_size=8, lr=1e-3, warmup_steps=0, pretrained=False,
        patience=0, n_boot=20, num_workers=0, smoke=True, threads=1,
    ),
}


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
    return dataclasses.replace(prof, weights=check_weights(weights))


# ------------------------------------------------------------------------------------- knobs
# Trainer-file / notebook knob names -> keyword arguments of the experiment functions.
KNOBS = {
    "ModelName": "model_name", "Profile": "profile", "Smoke": "smoke", "DataFull": "data_full",
    "DataCardiomegaly": "data_cardiomegaly", "ImageSize": "image_size", "Epochs": "epochs",
    "BatchSize": "batch_size", "LearningRate": "lr", "Head": "head", "Seed": "seed", "RunsDir": "runs_dir",
    "WithoutStage1": "without_stage1", "FreezeEarly": "freeze_early", "Backbones": "backbones",
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


# -------------------------------------------------------------------------------------- data
def find_default_dir(name: str) -> Path:
    """`name` (e.g. dataset_full) in the working directory or the nearest parent that has it.

    Notebooks run with their own folder as working directory, the trainer files usually from the
    repository root: both find the repository's dataset folders this way.
    """
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / name).is_dir():
            return folder / name
    return here / name


@functools.lru_cache(maxsize=32)
def _load_dataset_cached(root: str, stamp: tuple) -> Any:
    from common.data import load_dataset

    return load_dataset(root, quiet=True)


def _label_files(root: Path) -> tuple:
    """(name, size, mtime_ns) of the label files at the top of a dataset folder."""
    out = []
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in (".csv", ".txt", ".json"):
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_data(root: str | Path):
    """`common.data.load_dataset(root)`, memoised while its label files are unchanged."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        from common.data import DatasetError

        raise DatasetError(f"{root}: dataset folder not found (give a folder in the NIH, dataset_full or "
                           "dataset_cardiomegaly layout; see dataset_full/README.md)")
    return _load_dataset_cached(str(root), _label_files(root))


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 (16 hex digits) of a file's bytes, memoised while its size and mtime are unchanged."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_identity(root: str | Path) -> dict:
    """A dataset folder's identity in a run key: path, layout, image and patient counts, and the
    content of each label file (an edited label file makes a new run; a label file that was only
    touched or unpacked again keeps its runs)."""
    root = Path(root).resolve()
    ds = load_data(root)
    return {"path": str(root), "layout": ds.layout, "images": int(len(ds.frame)),
            "patients": int(ds.frame["patient_id"].nunique()),
            "label_files": [[name, size, _file_digest(str(root / name), size, mtime)]
                            for name, size, mtime in _label_files(root)]}


@dataclass(frozen=True)
class DataSpec:
    """The data an experiment uses: the full (14-label) set and/or the Cardiomegaly set."""

    full: Path | None
    cardiomegaly: Path | None
    synthetic: bool

    def dirs(self) -> list[str]:
        """Absolute dataset folders, Cardiomegaly set first (the study's stage-1 set)."""
        return [str(p) for p in (self.cardiomegaly, self.full) if p is not None]

    def datasets(self) -> list:
        return [load_data(d) for d in self.dirs()]

    def frame(self) -> pd.DataFrame:
        from common.data import combine

        return combine(self.datasets()).frame

    def identity(self) -> list[dict]:
        """What makes the data this data, for run keys: paths, layout, counts, label files."""
        return [dataset_identity(d) for d in self.dirs()]

    def describe(self) -> str:
        """One line for table headers: SYNTHETIC, or each folder with its image and patient counts."""
        parts = []
        for role, d in (("dataset_full", self.full), ("dataset_cardiomegaly", self.cardiomegaly)):
            if d is None:
                continue
            ds = load_data(d)
            parts.append(f"{role} = {display_path(d)} ({ds.layout} layout, {len(ds.frame)} images, "
                         f"{ds.frame['patient_id'].nunique()} patients)")
        text = "; ".join(parts) or "no data"
        return f"SYNTHETIC (the suite's generated default) - {text}" if self.synthetic else text

    def to_dict(self) -> dict:
        return {"full": str(self.full) if self.full else None,
                "cardiomegaly": str(self.cardiomegaly) if self.cardiomegaly else None, "synthetic": self.synthetic}

    @classmethod
    def from_dict(cls, d: Mapping) -> DataSpec:
        return cls(Path(d["full"]) if d.get("full") else None,
                   Path(d["cardiomegaly"]) if d.get("cardiomegaly") else None, bool(d.get("synthetic")))


def _is_cardiomegaly_layout(folder: Path) -> bool:
    from common.data import detect_layout

    return detect_layout(folder)[0] == "cardiomegaly"


def resolve_data(data_full: str | Path | None = None, data_cardiomegaly: str | Path | None = None) -> DataSpec:
    """The folders to use. None means `dataset_full/` / `dataset_cardiomegaly/` (from the working
    directory upwards) when they hold data; when neither given nor found, the synthetic default."""
    if data_full is None and data_cardiomegaly is None:
        from common.data import default_data_dirs

        full_dir, cardio_dir = find_default_dir("dataset_full"), find_default_dir("dataset_cardiomegaly")
        dirs, synthetic = default_data_dirs(full_dir=str(full_dir), cardio_dir=str(cardio_dir))
        full = cardio = None
        for d in dirs:
            d = Path(d).resolve()
            if _is_cardiomegaly_layout(d):
                cardio = d
            else:
                full = d
        return DataSpec(full, cardio, bool(synthetic))
    from common.data import has_data

    full = Path(data_full).expanduser().resolve() if data_full is not None else None
    cardio = Path(data_cardiomegaly).expanduser().resolve() if data_cardiomegaly is not None else None
    if full is None and has_data(find_default_dir("dataset_full")):
        full = find_default_dir("dataset_full").resolve()
    if cardio is None and has_data(find_default_dir("dataset_cardiomegaly")):
        cardio = find_default_dir("dataset_cardiomegaly").resolve()
    specs = [load_data(p) for p in (full, cardio) if p is not None]  # a clear error for a bad folder
    return DataSpec(full, cardio, any(bool(getattr(s, "is_synthetic", False)) for s in specs))


def display_path(path: str | Path) -> str:
    """A data folder as table headers show it: relative to the checkout when it sits beside it
    (../shared/data/nih-sample), under ~ when in the home folder, else absolute."""
    p = Path(path).resolve()
    repo = Path(__file__).resolve().parents[1]
    rel = os.path.relpath(p, repo)
    if not rel.startswith(os.pardir + os.sep + os.pardir):
        return rel
    with contextlib.suppress(ValueError, RuntimeError):
        return "~/" + str(p.relative_to(Path.home()))
    return str(p)


def title(text: str, synthetic: bool) -> str:
    """A table or plot title that says SYNTHETIC when the data is."""
    return f"SYNTHETIC DATA - {text}" if synthetic else text


# -------------------------------------------------------------------------------------- runs
def runs_dir(path: str | Path | None = None) -> Path:
    """The run cache: `path`, else $MEDIMAGING_RUNS, else <common.cache.cache_root()>/runs."""
    if path is not None:
        return Path(path).expanduser().resolve()
    if os.environ.get("MEDIMAGING_RUNS"):
        return Path(os.environ["MEDIMAGING_RUNS"]).expanduser().resolve()
    from common.cache import cache_root

    return (cache_root() / "runs").resolve()


# Fields of TrainConfig that say how to run, not what to compute: not part of a run's key.
_HOW_TO_RUN = ("out", "progress", "num_workers", "device", "eval_batch_size", "checkpoint_every")


def _source_identity(source: str) -> Any:
    """init_from / pretrained paths in a key: a run by its folder name (which holds its own key),
    a file by name, size and mtime."""
    p = Path(source)
    if p.is_dir() and (p / runfiles.CONFIG).is_file():
        return {"run": p.name}
    if p.is_file():
        st = p.stat()
        return {"file": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return source


def run_key(config) -> str:
    """12 hex digits naming a run: its training configuration and the identity of its data."""
    d = config.asdict()
    for k in _HOW_TO_RUN:
        d.pop(k, None)
    if not config.data:
        raise ValueError("run_key: the configuration names no data folders (TrainConfig.data is empty)")
    d["data"] = [dataset_identity(p) for p in config.data]
    if d.get("init_from"):
        d["init_from"] = _source_identity(d["init_from"])
    if isinstance(d.get("pretrained"), str) and d["pretrained"] not in ("True", "False"):
        d["pretrained"] = _source_identity(d["pretrained"])
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


RUN_LOCK = ".lock"  # in each cached run folder: held while the run trains


def _run_lock(run_dir: Path):
    """One process trains a given run at a time; a second one waits, then finds it finished."""
    from common.cache import file_lock

    return file_lock(run_dir / RUN_LOCK)


@dataclass
class RunRef:
    """One run as an experiment uses it."""

    role: str  # "stage 1", "stage 2", "ResNet-50", ...
    run_dir: Path
    requested_model: str  # the backbone the experiment names
    model_name: str  # what the profile trained for it
    reused: bool  # True: found finished in the cache, not trained now

    def metrics(self) -> dict:
        return runfiles.load_json(self.run_dir / runfiles.METRICS_JSON)

    def config(self) -> dict:
        return runfiles.read_config(self.run_dir)

    def history(self) -> pd.DataFrame:
        path = self.run_dir / runfiles.METRICS_CSV
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def model_label(self) -> str:
        if self.model_name == self.requested_model:
            return self.model_name
        return f"{self.model_name} (for {self.requested_model})"

    def to_dict(self) -> dict:
        return {"role": self.role, "run_dir": str(self.run_dir), "requested_model": self.requested_model,
                "model_name": self.model_name, "reused": self.reused}

    @classmethod
    def from_dict(cls, d: Mapping) -> RunRef:
        return cls(d["role"], Path(d["run_dir"]), d["requested_model"], d["model_name"], bool(d["reused"]))


def _workers(wanted: int) -> int:
    """A profile's DataLoader workers, at most one per core: the paper profile's 4 on a 2-core
    machine only add processes (and torch's warning about them). Not part of a run's key."""
    from common.cache import default_workers

    return min(int(wanted), default_workers())


def train_config(profile: Profile, model_name: str, task: str, data: DataSpec, *, init_from: str | Path | None = None,
                 freeze: int = 0, image_size: int | None = None, epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, head: str = "mlp", seed: int = 49):
    """The TrainConfig of one training of the suite (everything but `out`)."""
    from common.train_config import TrainConfig

    return TrainConfig(
        data=data.dirs(), task=task, model_name=profile.model_for(model_name), head=head,
        # a run that starts from another run's backbone needs no hub download first
        pretrained=profile.pretrained_for(profile.model_for(model_name)) if init_from is None else False,
        init_from=str(init_from) if init_from is not None else None, freeze=int(freeze),
        image_size=int(image_size or profile.image_size), epochs=int(epochs or profile.epochs),
        max_steps=profile.max_steps, batch_size=int(batch_size or profile.batch_size), lr=float(lr or profile.lr),
        warmup_steps=profile.warmup_steps, patience=profile.patience, n_boot=profile.n_boot, seed=int(seed),
        num_workers=_workers(profile.num_workers), out="",
    )


def touch_used(run_dir: Path) -> None:
    """Mark a cached run as just used (its folder's mtime), so `medimaging cache clear --older-than`
    keeps what is still being reused. Nothing reads the folder's mtime as a run's identity."""
    try:
        os.utime(run_dir)
    except OSError:  # a read-only run cache is still usable
        pass


def cached_fit(config, role: str, requested_model: str, runs: str | Path | None = None) -> RunRef:
    """Train `config` into RUNS/<task>-<model>-<key>, or reuse that run when it already finished."""
    from common.train import fit

    root = runs_dir(runs)
    key = run_key(config)
    run_dir = root / f"{config.task}-{_slug(config.model_name)}-{key}"
    done = run_dir / runfiles.METRICS_JSON
    reused = done.is_file()
    if reused:
        print(f"{role}: reusing the finished run {display_path(run_dir)}", file=sys.stderr)
        touch_used(run_dir)
    else:
        with _run_lock(run_dir):
            reused = done.is_file()  # another process may have finished it while we waited
            if not reused:
                print(f"{role}: training {config.model_name} ({config.task}) into {display_path(run_dir)}",
                      file=sys.stderr)
                fit(dataclasses.replace(config, out=str(run_dir)))
    return RunRef(role, run_dir, requested_model, config.model_name, reused)


# ------------------------------------------------------------------------------- test splits
@functools.lru_cache(maxsize=16)
def _task_frame(data: tuple[str, ...], task: str, seed: int, fractions: tuple[float, ...]) -> pd.DataFrame:
    from common.data import combine, task_split

    return task_split(combine([load_data(d) for d in data]).frame, task, seed=seed, fractions=fractions)[0]


def split_frame(run_dir: str | Path) -> pd.DataFrame:
    """A run's rows with their train/dev/test split, recomputed exactly as `fit` made them."""
    train = runfiles.read_config(run_dir)["train"]
    if not train.get("data"):
        raise ValueError(f"{run_dir}: the run names no data folders; cannot recompute its split")
    return _task_frame(tuple(train["data"]), train["task"], int(train["seed"]),
                       tuple(float(f) for f in train["split_fractions"]))


@dataclass
class HeldOut:
    """A run's test split: its rows, labels and predicted probabilities, aligned."""

    frame: pd.DataFrame
    labels: list[str]
    y_true: np.ndarray
    y_prob: np.ndarray
    thresholds: dict[str, float]


def held_out(run_dir: str | Path) -> HeldOut:
    """The run's test_predictions.csv joined row by row with the labels of the recomputed split."""
    run_dir = Path(run_dir)
    cfg = runfiles.read_config(run_dir)
    labels = list(cfg["labels"])
    frame = split_frame(run_dir)
    unreadable_csv = run_dir / "unreadable.csv"
    test = frame[frame["split"] == "test"]
    if unreadable_csv.is_file():
        bad = set(pd.read_csv(unreadable_csv)["path"].astype(str))
        test = test[~test["path"].isin(bad)]
    pred = pd.read_csv(run_dir / runfiles.TEST_PREDICTIONS, dtype={"Image Index": str})
    if len(pred) != len(test) or not (pred["Image Index"].to_numpy() == test["image_id"].to_numpy()).all():
        raise ValueError(
            f"{run_dir / runfiles.TEST_PREDICTIONS}: its {len(pred)} rows do not line up with the {len(test)} test "
            "images of the recomputed split; the data folders changed after the run. Delete the run folder to retrain."
        )
    return HeldOut(test.reset_index(drop=True), labels, test[labels].to_numpy(dtype=np.float64),
                   pred[labels].to_numpy(dtype=np.float64), runfiles.read_thresholds(run_dir, labels))


# ------------------------------------------------------------------------------------ tables
def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class Table:
    """A titled table; `markdown()` for tables.md, rendered as markdown in notebooks."""

    title: str
    frame: pd.DataFrame
    note: str = ""

    def markdown(self) -> str:
        cols = [str(c) for c in self.frame.columns]
        lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
        for row in self.frame.itertuples(index=False):
            lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return f"**{self.title}**\n\n{self.markdown()}\n\n{self.note}".rstrip()

    def to_dict(self) -> dict:
        return {"title": self.title, "markdown": self.markdown(), "note": self.note,
                "columns": [str(c) for c in self.frame.columns], "rows": self.frame.astype(str).values.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Table:
        return cls(d["title"], pd.DataFrame(d.get("rows", []), columns=d.get("columns")), d.get("note", ""))


def pct(value: float | None) -> str:
    """A 0-1 rate as a percentage with two decimals (the study's format), or n/a."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    """AUROC with its bootstrap 95% interval: 0.781 [0.702, 0.853]."""
    if value is None:
        return "n/a (one class only)"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _mean_prevalence(m: Mapping) -> float | None:
    vals = [m["n_positive"][n] / m["n_labelled"][n] for n in m["labels"] if m.get("n_labelled", {}).get(n)]
    return float(np.mean(vals)) if vals else None


def baseline_row(m: Mapping, name_col: str, extra: Mapping[str, str] | None = None) -> dict:
    """The trivial baselines of a metrics dict: "absent" everywhere (accuracy) and chance (AUROC 0.5)."""
    return {name_col: "Trivial: predict 'absent' for all (accuracy); chance (AUROC 0.5)",
            "Accuracy (%)": pct(m.get("mean_baseline_all_absent_accuracy")), "AUROC [95% CI]": "0.500",
            "AUPRC": num(_mean_prevalence(m)) + " (prevalence)", **(extra or {})}


def model_row(m: Mapping, name_col: str, name: str, extra: Mapping[str, str] | None = None) -> dict:
    return {name_col: name, "Accuracy (%)": pct(m.get("mean_accuracy")),
            "AUROC [95% CI]": with_ci(m.get("mean_auroc"), m.get("mean_auroc_ci")), "AUPRC": num(m.get("mean_auprc")),
            **(extra or {})}


def per_label_table(m: Mapping, ttl: str, note: str = "", compare: Mapping[str, Mapping] | None = None) -> Table:
    """One row per label: positives, accuracy beside the all-absent baseline, AUROC with CI, AUPRC,
    tuned-threshold sensitivity/specificity/F1, CheXNet's published AUROC; `compare` adds AUROC
    columns of other runs."""
    rows = []
    for name in m["labels"]:
        row = {
            "Label": name, "Positives / labelled": f"{m['n_positive'][name]} / {m.get('n_labelled', {}).get(name, m['n_images'])}",
            "Accuracy (%)": pct(m["accuracy"][name]), "All-absent accuracy (%)": pct(m["baseline_all_absent_accuracy"][name]),
            "AUROC [95% CI]": with_ci(m["auroc"][name], m["auroc_ci"][name]), "AUPRC": num(m["auprc"][name]),
            "Sensitivity": num(m["sensitivity"][name]), "Specificity": num(m["specificity"][name]), "F1": num(m["f1"][name]),
        }
        for col, other in (compare or {}).items():
            row[col] = with_ci(other["auroc"].get(name), other["auroc_ci"].get(name)) if name in other["auroc"] else "n/a"
        row["CheXNet AUROC (published)"] = num(CHEXNET_AUROC.get(name), 4)
        rows.append(row)
    mean = {
        "Label": "Mean", "Positives / labelled": f"{m['n_images']} images", "Accuracy (%)": pct(m["mean_accuracy"]),
        "All-absent accuracy (%)": pct(m["mean_baseline_all_absent_accuracy"]),
        "AUROC [95% CI]": with_ci(m["mean_auroc"], m["mean_auroc_ci"]), "AUPRC": num(m["mean_auprc"]),
        "Sensitivity": num(m.get("mean_sensitivity")), "Specificity": num(m.get("mean_specificity")),
        "F1": num(m.get("mean_f1")),
    }
    for col, other in (compare or {}).items():
        mean[col] = with_ci(other.get("mean_auroc"), other.get("mean_auroc_ci"))
    mean["CheXNet AUROC (published)"] = num(CHEXNET_MEAN_AUROC, 3) if len(m["labels"]) == len(LABELS) else "n/a"
    rows.append(mean)
    base = ("Trivial baselines: 'All-absent accuracy' predicts every finding absent; chance AUROC is 0.500. "
            "Sensitivity / specificity / F1 at per-label thresholds tuned on the dev split.")
    return Table(ttl, pd.DataFrame(rows), f"{base} {note}".strip())


# -------------------------------------------------------------------------------- experiments
@dataclass
class Experiment:
    """What one notebook reports: its runs, tables, figures and headline numbers."""

    name: str  # the reproduce notebook name: OUT/tables/<name>.json
    title: str
    profile: str
    data: DataSpec
    runs: dict[str, RunRef] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    headline: dict[str, Any] = field(default_factory=dict)  # numbers the results notebook compares
    notes: str = ""

    @property
    def synthetic(self) -> bool:
        return self.data.synthetic

    def title_for(self, text: str) -> str:
        return title(text, self.synthetic)

    def report(self) -> str:
        """Every table as markdown, headed by the data and the profile."""
        parts = [f"# {self.title_for(self.title)}", "", f"Data: {self.data.describe()}", f"Profile: {self.profile}", ""]
        if self.notes:
            parts += [self.notes, ""]
        for t in self.tables:
            parts += [f"## {t.title}", "", t.markdown(), ""]
            if t.note:
                parts += [t.note, ""]
        return "\n".join(parts)

    def _repr_markdown_(self) -> str:
        return self.report()

    def save_figure(self, fig, out_dir: str | Path | None, name: str) -> Path | None:
        """Write a matplotlib Figure to OUT/figures/<experiment>_<name>.png (None: not saved)."""
        if out_dir is None:
            return None
        path = Path(out_dir) / "figures" / f"{self.name}_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        if path.name not in self.figures:
            self.figures.append(path.name)
        return path

    def figure(self, fig, out_dir: str | Path | None, name: str):
        """Save a Figure (see `save_figure`) and return it as an image for the notebook to show."""
        import io

        from IPython.display import Image

        self.save_figure(fig, out_dir, name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        return Image(data=buf.getvalue(), format="png")

    def to_dict(self, out_dir: str | Path | None = None) -> dict:
        """A JSON-able record; `out_dir`'s own changes do not make the commit count as dirty."""
        from common.reproduce import git_commit

        return {
            "name": self.name, "title": self.title_for(self.title), "profile": self.profile,
            "data": self.data.describe(), "data_spec": self.data.to_dict(), "synthetic": self.synthetic,
            "commit": git_commit(exclude=out_dir), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "runs": {k: r.to_dict() for k, r in self.runs.items()}, "tables": [t.to_dict() for t in self.tables],
            "figures": self.figures, "headline": self.headline, "notes": self.notes,
        }

    def save(self, out_dir: str | Path | None) -> Path | None:
        """Write OUT/tables/<name>.json (what `medimaging reproduce` collects into tables.md)."""
        if out_dir is None:
            return None
        path = Path(out_dir) / "tables" / f"{self.name}.json"
        runfiles.save_json(path, self.to_dict(out_dir))
        return path


def load_experiments(out_dir: str | Path) -> dict[str, dict]:
    """The saved experiment records under OUT/tables, by name, in reproduce order."""
    from common.reproduce import notebook_names

    folder = Path(out_dir) / "tables"
    found = {p.stem: runfiles.load_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
    order = [n for n in notebook_names() if n in found] + [n for n in found if n not in notebook_names()]
    return {n: found[n] for n in order}


@dataclass
class _Setup:
    profile: Profile
    data: DataSpec
    runs: Path
    kw: dict  # train_config keyword arguments shared by the experiment's runs


def _passive_openmp() -> None:
    """Let OpenMP threads sleep rather than spin while they wait, when torch is not loaded yet (it
    reads this once): spinning threads train 10x slower when anything else wants the cores (see
    common.reproduce.python_kernel, which does the same for notebook kernels)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _setup(profile, smoke, data_full, data_cardiomegaly, runs_dir_, image_size, epochs, batch_size, lr, head, seed) -> _Setup:
    _passive_openmp()
    prof = get_profile(profile, smoke)
    data = resolve_data(data_full, data_cardiomegaly)
    if not data.dirs():
        raise ValueError("no data: give DataFull and/or DataCardiomegaly, or leave both None for the defaults")
    kw = dict(image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, head=head, seed=seed)
    if prof.threads:
        import torch

        torch.set_num_threads(prof.threads)
    return _Setup(prof, data, runs_dir(runs_dir_), kw)


def _profile_label(s: _Setup) -> str:
    return s.profile.label


def _stage1(s: _Setup, model_name: str) -> RunRef:
    cfg = train_config(s.profile, model_name, "cardiomegaly", s.data, **s.kw)
    return cached_fit(cfg, "stage 1", model_name, s.runs)


def _stage2(s: _Setup, model_name: str, init: RunRef | None, role: str, freeze: int = 0) -> RunRef:
    cfg = train_config(s.profile, model_name, "all14", s.data, init_from=init.run_dir if init else None,
                       freeze=freeze, **s.kw)
    return cached_fit(cfg, role, model_name, s.runs)


def _stage1_table(exp: Experiment, run: RunRef, stage_name: str) -> Table:
    m = run.metrics()
    n = f"{m['n_images']} ({m['n_positive']['Cardiomegaly']} Cardiomegaly)"
    extra = {"Sensitivity / specificity": f"{num(m['sensitivity']['Cardiomegaly'])} / "
                                          f"{num(m['specificity']['Cardiomegaly'])}"}
    rows = [
        {"Test images": n, **model_row(m, "Model", f"{run.model_label()}, {stage_name}", extra)},
        {"Test images": n, **baseline_row(m, "Model", {"Sensitivity / specificity": "0.000 / 1.000"})},
        {"Model": "Original study (reported): EfficientNet-B4, hub + medical pretraining", "Accuracy (%)": f"{STUDY['stage1_accuracy']:.2f}",
         "AUROC [95% CI]": "not reported", "AUPRC": "not reported", "Test images": "437 (leaderboard, labels unpublished)",
         "Sensitivity / specificity": "not reported"},
    ]
    frame = pd.DataFrame(rows)
    frame = frame[["Model", *[c for c in frame.columns if c != "Model"]]]
    return Table(exp.title_for(f"{stage_name}: Cardiomegaly vs No Finding, test split"), frame,
                 "Accuracy at threshold 0.5 (the study's metric); AUROC with its bootstrap 95% interval; "
                 "sensitivity / specificity at the threshold tuned on the dev split. Split by patient.")


def single_task(model_name: str = STUDY_MODEL, profile: str = "quick", smoke: bool = False, data_full=None,
                data_cardiomegaly=None, image_size: int | None = None, epochs: int | None = None,
                batch_size: int | None = None, lr: float | None = None, head: str = "mlp", seed: int = 49,
                runs_dir: str | Path | None = None) -> Experiment:
    """Stage 1: Cardiomegaly vs No Finding on dataset_cardiomegaly + the dataset_full images that
    are Cardiomegaly or No Finding. Reports test accuracy (the study's 83.95) and AUROC."""
    s = _setup(profile, smoke, data_full, data_cardiomegaly, runs_dir, image_size, epochs, batch_size, lr, head, seed)
    exp = Experiment("single_task", "Stage 1 (single-task): Cardiomegaly vs No Finding", _profile_label(s), s.data)
    run = _stage1(s, model_name)
    exp.runs["stage 1"] = run
    exp.tables.append(_stage1_table(exp, run, "Stage 1"))
    m = run.metrics()
    exp.headline = {**_stage1_headline(m), "model": run.model_label()}
    return exp


def _stage1_headline(m: Mapping) -> dict:
    return {"stage1_accuracy": m.get("mean_accuracy"), "stage1_auroc": m.get("mean_auroc"),
            "stage1_auroc_ci": m.get("mean_auroc_ci"),
            "stage1_baseline_accuracy": m.get("mean_baseline_all_absent_accuracy")}


def _comparable_cardiomegaly(before: RunRef, after: RunRef) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Images both runs held out as test whose patients neither run trained or selected on, with
    the Cardiomegaly label and each run's probability."""
    a, b = held_out(before.run_dir), held_out(after.run_dir)
    seen = set()
    for run in (before, after):
        frame = split_frame(run.run_dir)
        seen |= set(frame.loc[frame["split"] != "test", "patient_id"].astype(str))
    ja, jb = a.labels.index("Cardiomegaly"), b.labels.index("Cardiomegaly")
    pa = pd.DataFrame({"image_id": a.frame["image_id"], "patient_id": a.frame["patient_id"].astype(str),
                       "y": a.y_true[:, ja], "p_before": a.y_prob[:, ja]}).drop_duplicates("image_id")
    pb = pd.DataFrame({"image_id": b.frame["image_id"], "p_after": b.y_prob[:, jb]}).drop_duplicates("image_id")
    both = pa.merge(pb, on="image_id")
    both = both[~both["patient_id"].isin(seen) & both["y"].notna()].reset_index(drop=True)
    return both, both["y"].to_numpy()[:, None], both["p_before"].to_numpy()[:, None], both["p_after"].to_numpy()[:, None]


def _before_after_table(exp: Experiment, s: _Setup, stage1: RunRef, stage2: RunRef) -> tuple[Table, dict]:
    from common.metrics import evaluate_predictions

    both, y, p1, p2 = _comparable_cardiomegaly(stage1, stage2)
    label = ["Cardiomegaly"]
    name = "Test images"
    n = f"{len(both)} ({int(np.nansum(y))} Cardiomegaly)"
    if len(both) == 0:
        rows = [{"Model": "no test image is held out by both stages", name: "0", "Accuracy (%)": "n/a",
                 "AUROC [95% CI]": "n/a"}]
        return Table(exp.title_for("Cardiomegaly before / after stage 2"), pd.DataFrame(rows)), {}
    m1 = evaluate_predictions(y, p1, label, n_boot=s.profile.n_boot, seed=0)
    m2 = evaluate_predictions(y, p2, label, n_boot=s.profile.n_boot, seed=0)
    rows = [
        {"Model": f"Stage 1 model ({stage1.model_label()})", name: n, "Accuracy (%)": pct(m1["mean_accuracy"]),
         "AUROC [95% CI]": with_ci(m1["mean_auroc"], m1["mean_auroc_ci"])},
        {"Model": "Stage 2 model (14-label head, from stage 1)", name: n, "Accuracy (%)": pct(m2["mean_accuracy"]),
         "AUROC [95% CI]": with_ci(m2["mean_auroc"], m2["mean_auroc_ci"])},
        {"Model": "Trivial: predict 'absent' (accuracy); chance (AUROC)", name: n,
         "Accuracy (%)": pct(m1["mean_baseline_all_absent_accuracy"]), "AUROC [95% CI]": "0.500"},
        {"Model": "Original study (reported): before -> after", name: "437 (leaderboard)",
         "Accuracy (%)": f"{STUDY['stage1_accuracy']:.2f} -> {STUDY['cardiomegaly_after_stage2_accuracy']:.2f}",
         "AUROC [95% CI]": "not reported"},
    ]
    note = ("Both models scored on the same images: those in both stages' test splits whose patients neither "
            "stage trained or selected checkpoints on. Accuracy at 0.5.")
    head = {"cardiomegaly_before_accuracy": m1["mean_accuracy"], "cardiomegaly_after_accuracy": m2["mean_accuracy"],
            "cardiomegaly_before_auroc": m1["mean_auroc"], "cardiomegaly_after_auroc": m2["mean_auroc"],
            "cardiomegaly_compared_images": len(both),
            "cardiomegaly_baseline_accuracy": m1["mean_baseline_all_absent_accuracy"]}
    return Table(exp.title_for("Cardiomegaly before / after stage 2 (same images)"), pd.DataFrame(rows), note), head


def _summary_table(exp: Experiment, runs_: Sequence[tuple[str, RunRef, str | None]]) -> Table:
    """Stage 2 summary: dev and test mean accuracy over the 14 labels, mean AUROC / AUPRC."""
    rows = []
    first = None
    for name, run, study in runs_:
        m = run.metrics()
        first = first or m
        dev = m.get("dev") or {}
        rows.append({"Model": f"{name}: {run.model_label()}", "Dev mean accuracy (%)": pct(dev.get("mean_accuracy")),
                     "Study's dev mean accuracy (%)": study or "not reported",
                     "Test mean accuracy (%)": pct(m.get("mean_accuracy")),
                     "Test mean AUROC [95% CI]": with_ci(m.get("mean_auroc"), m.get("mean_auroc_ci")),
                     "Test mean AUPRC": num(m.get("mean_auprc"))})
    dev = (first or {}).get("dev") or {}
    rows.append({"Model": "Trivial: predict 'absent' for all (accuracy); chance (AUROC 0.5)",
                 "Dev mean accuracy (%)": pct(dev.get("mean_baseline_all_absent_accuracy")),
                 "Study's dev mean accuracy (%)": "not reported",
                 "Test mean accuracy (%)": pct((first or {}).get("mean_baseline_all_absent_accuracy")),
                 "Test mean AUROC [95% CI]": "0.500",
                 "Test mean AUPRC": num(_mean_prevalence(first)) + " (prevalence)" if first else "n/a"})
    rows.append({"Model": "CheXNet (published; DenseNet-121, ImageNet-pretrained, 112k NIH images)",
                 "Dev mean accuracy (%)": "not reported", "Study's dev mean accuracy (%)": "",
                 "Test mean accuracy (%)": "not reported", "Test mean AUROC [95% CI]": f"{CHEXNET_MEAN_AUROC:.3f}",
                 "Test mean AUPRC": "not reported"})
    return Table(exp.title_for("Stage 2: all 14 labels, mean over labels"), pd.DataFrame(rows),
                 "Mean accuracy at 0.5 over the 14 labels is the study's metric (dev split, best checkpoint); the "
                 "trivial 'absent' baseline already scores high on it. AUROC with its bootstrap 95% interval.")


def two_stage(name: str, model_name: str, profile: str = "quick", smoke: bool = False, data_full=None,
              data_cardiomegaly=None, image_size: int | None = None, epochs: int | None = None,
              batch_size: int | None = None, lr: float | None = None, head: str = "mlp", seed: int = 49,
              runs_dir: str | Path | None = None, without_stage1: bool = True,
              experiment_title: str = "Stage 2 (multi-task): the adaptive fine-tune") -> Experiment:
    """Stage 1, then stage 2 initialised from it (14-label head, both datasets, masked labels);
    optionally stage 2 without stage 1; Cardiomegaly before / after stage 2."""
    s = _setup(profile, smoke, data_full, data_cardiomegaly, runs_dir, image_size, epochs, batch_size, lr, head, seed)
    exp = Experiment(name, experiment_title, _profile_label(s), s.data)
    stage1 = _stage1(s, model_name)
    stage2 = _stage2(s, model_name, stage1, "stage 2")
    exp.runs.update({"stage 1": stage1, "stage 2": stage2})
    listed = [("Stage 2 from stage 1", stage2, f"{STUDY['stage2_dev_mean_accuracy']:.2f}")]
    compare = {}
    if without_stage1:
        scratch = _stage2(s, model_name, None, "stage 2 without stage 1")
        exp.runs["stage 2 without stage 1"] = scratch
        listed.append(("Stage 2 without stage 1", scratch, f"{STUDY['stage2_without_stage1_dev_mean_accuracy']:.2f}"))
        compare["AUROC without stage 1"] = scratch.metrics()
    exp.tables.append(_stage1_table(exp, stage1, "Stage 1"))
    exp.tables.append(_summary_table(exp, listed))
    m2 = stage2.metrics()
    exp.tables.append(per_label_table(m2, exp.title_for(f"Stage 2 per label, test split ({stage2.model_label()})"),
                                      compare=compare))
    before_after, head_ba = _before_after_table(exp, s, stage1, stage2)
    exp.tables.append(before_after)
    exp.headline = {
        "model": stage2.model_label(), **_stage1_headline(stage1.metrics()),
        "stage2_dev_mean_accuracy": (m2.get("dev") or {}).get("mean_accuracy"),
        "stage2_dev_baseline_accuracy": (m2.get("dev") or {}).get("mean_baseline_all_absent_accuracy"),
        "stage2_test_mean_accuracy": m2.get("mean_accuracy"), "stage2_mean_auroc": m2.get("mean_auroc"),
        "stage2_mean_auroc_ci": m2.get("mean_auroc_ci"), **head_ba,
    }
    if without_stage1:
        ms = exp.runs["stage 2 without stage 1"].metrics()
        exp.headline.update({"without_stage1_dev_mean_accuracy": (ms.get("dev") or {}).get("mean_accuracy"),
                             "without_stage1_mean_auroc": ms.get("mean_auroc")})
    return exp


def multi_task(model_name: str = STUDY_MODEL, **kwargs) -> Experiment:
    """The study's stage 2 with both comparisons (see `two_stage`)."""
    return two_stage("multi_task", model_name, **kwargs)


def transformer(model_name: str = STUDY_VIT, without_stage1: bool = False, **kwargs) -> Experiment:
    """The two stages with a ViT backbone (see `two_stage`)."""
    return two_stage("transformer", model_name, without_stage1=without_stage1,
                     experiment_title="The two stages with a vision transformer", **kwargs)


def _weights_millions(run: RunRef) -> float | None:
    """Parameters (+ buffers) in the run's weights, read from the safetensors header only."""
    from safetensors import safe_open

    path = run.run_dir / runfiles.BEST
    if not path.is_file():
        return None
    total = 0
    with safe_open(str(path), framework="numpy") as f:
        for k in f.keys():
            total += int(np.prod(f.get_slice(k).get_shape()))
    return total / 1e6


def _train_speed(run: RunRef) -> str:
    h = run.history()
    if h.empty or "images_per_s" not in h or h["images_per_s"].dropna().empty:
        return "n/a"
    return f"{h['images_per_s'].dropna().mean():.0f}"


def backbone_ablation(backbones: Sequence[str] | Sequence[tuple[str, str]] | None = None, profile: str = "quick",
                      smoke: bool = False, data_full=None, data_cardiomegaly=None, image_size: int | None = None,
                      epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                      head: str = "mlp", seed: int = 49, runs_dir: str | Path | None = None) -> Experiment:
    """Every backbone of `BACKBONES` (or the named subset / (row, timm name) pairs) trained the
    same way on all 14 labels (stage 2 without stage 1, the profile's initialisation)."""
    s = _setup(profile, smoke, data_full, data_cardiomegaly, runs_dir, image_size, epochs, batch_size, lr, head, seed)
    exp = Experiment("backbone_ablation", "Backbone ablation: all 14 labels, same recipe", _profile_label(s), s.data)
    chosen = _choose_backbones(backbones)
    # rows whose backbones this profile trains as the same model share one run, and one table row
    groups: dict[Path, list[tuple[str, str]]] = {}
    for row_name, timm_name in chosen:
        run = _stage2(s, timm_name, None, row_name)
        exp.runs[row_name] = run
        groups.setdefault(run.run_dir, []).append((row_name, timm_name))
    rows, per_label = [], {}
    first = None
    for members in groups.values():
        row_name = " / ".join(r for r, _ in members)
        run = exp.runs[members[0][0]]
        m = run.metrics()
        first = first or m
        per_label[row_name] = m.get("auroc", {})
        rows.append({"Backbone": row_name, "Named": ", ".join(t for _, t in members),
                     "Trained (this profile)": run.model_name, "Weights (M)": num(_weights_millions(run), 1),
                     "Train images/s": _train_speed(run), **model_row(m, "Backbone", row_name)})
    rows.append({"Backbone": "Trivial baselines", "Named": "", "Trained (this profile)": "", "Weights (M)": "",
                 "Train images/s": "", **baseline_row(first, "Backbone")})
    rows.append({"Backbone": "CheXNet (published)", "Named": "densenet121", "Trained (this profile)":
                 "ImageNet-pretrained, 112k NIH images", "Weights (M)": "8.0", "Train images/s": "",
                 "Accuracy (%)": "not reported", "AUROC [95% CI]": f"{CHEXNET_MEAN_AUROC:.3f}",
                 "AUPRC": "not reported"})
    frame = pd.DataFrame(rows).rename(columns={"Accuracy (%)": "Test mean accuracy (%)", "AUROC [95% CI]": "Test mean AUROC [95% CI]",
                                  "AUPRC": "Test mean AUPRC"})
    mapped = [f"{n} -> {run.model_name}" for n, run in ((t, exp.runs[r]) for r, t in chosen) if run.model_name != n]
    note = (f"Profile {s.profile.name}: " + ("each named backbone is trained as its listed small variant ("
            + "; ".join(mapped) + "); backbones trained as the same model share a row. " if mapped
            else "every backbone trained as named. ")
            + ("VGG: RepVGG-A0 (VGG-style plain 3x3 stack) stands in for VGG-16, because timm's smallest VGG "
               "has a 102M-weight classifier block that alone exceeds this profile's CPU budget. "
               if "repvgg_a0" in [r.model_name for r in exp.runs.values()] else "")
            + "Random initialisation unless the profile loads hub weights. The study named VGG, ResNet, DarkNet "
              "and ViT 'all below EfficientNet' without numbers.")
    exp.tables.append(Table(exp.title_for("Backbone ablation: all 14 labels, test split"), frame, note))
    auroc = pd.DataFrame({r: {lab: num(v) for lab, v in aurocs.items()} for r, aurocs in per_label.items()})
    auroc.insert(0, "Label", auroc.index)
    auroc["CheXNet (published)"] = [num(CHEXNET_AUROC[lab], 4) for lab in auroc["Label"]]
    exp.tables.append(Table(exp.title_for("Backbone ablation: per-label test AUROC"), auroc.reset_index(drop=True),
                            "Chance is 0.500 for every label."))
    exp.headline = {"backbones": {r: exp.runs[r].metrics().get("mean_auroc") for r, _ in chosen}}
    return exp


def plot_backbones(exp: Experiment):
    """Test mean AUROC (95% interval) per backbone, with chance and CheXNet's published mean."""
    fig = _figure(10, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    names, vals, err = [], [], []
    groups: dict[Path, list[str]] = {}
    for role, run in exp.runs.items():
        groups.setdefault(run.run_dir, []).append(role)
    for roles in groups.values():
        run = exp.runs[roles[0]]
        m = run.metrics()
        v, ci = m.get("mean_auroc"), m.get("mean_auroc_ci")
        names.append(f"{' / '.join(roles)}\n({run.model_name})")
        vals.append(np.nan if v is None else v)
        err.append([v - ci[0], ci[1] - v] if (v is not None and ci) else [0, 0])
    x = np.arange(len(names))
    ax.bar(x, vals, yerr=np.array(err).T if err else None, capsize=3, color="tab:blue", label="test mean AUROC (95% CI)")
    ax.axhline(0.5, color="red", linestyle=":", label="chance (0.5)")
    ax.axhline(CHEXNET_MEAN_AUROC, color="grey", linestyle="--", label=f"CheXNet published ({CHEXNET_MEAN_AUROC})")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean AUROC over 14 labels")
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(exp.title_for("Backbone ablation: test mean AUROC"))
    fig.tight_layout()
    return fig


def _choose_backbones(backbones) -> list[tuple[str, str]]:
    if backbones is None:
        return list(BACKBONES)
    out = []
    by_row = {r: t for r, t in BACKBONES}
    by_timm = {t: r for r, t in BACKBONES}
    for b in backbones:
        if isinstance(b, (tuple, list)):
            out.append((str(b[0]), str(b[1])))
        elif b in by_row:
            out.append((b, by_row[b]))
        else:
            out.append((by_timm.get(b, b), b))
    return out


def freeze_ablation(model_name: str = STUDY_MODEL, freeze_early: int = 3, profile: str = "quick", smoke: bool = False,
                    data_full=None, data_cardiomegaly=None, image_size: int | None = None, epochs: int | None = None,
                    batch_size: int | None = None, lr: float | None = None, head: str = "mlp", seed: int = 49,
                    runs_dir: str | Path | None = None) -> Experiment:
    """Stage 2 from stage 1 with nothing frozen, the first `freeze_early` backbone groups frozen,
    and the whole backbone frozen (head only)."""
    from common.models import backbone_groups, build_model

    s = _setup(profile, smoke, data_full, data_cardiomegaly, runs_dir, image_size, epochs, batch_size, lr, head, seed)
    exp = Experiment("freeze_ablation", "Freezing ablation: stage 2 from stage 1", _profile_label(s), s.data)
    stage1 = _stage1(s, model_name)
    exp.runs["stage 1"] = stage1
    n_groups = len(backbone_groups(build_model(s.profile.model_for(model_name), num_labels=len(LABELS), pretrained=None)))
    early = max(1, min(int(freeze_early), n_groups - 1))
    variants = [("nothing frozen", 0), (f"early stages frozen (first {early} of {n_groups} groups)", early),
                ("all but the head frozen", -1)]
    rows, first = [], None
    for role, k in variants:
        run = _stage2(s, model_name, stage1, role, freeze=k)
        exp.runs[role] = run
        m = run.metrics()
        first = first or m
        frozen = run.config().get("frozen") or []
        rows.append({"Frozen": role, "Groups frozen": ", ".join(frozen) if frozen else "none",
                     "Dev mean accuracy (%)": pct((m.get("dev") or {}).get("mean_accuracy")),
                     "Train images/s": _train_speed(run), **model_row(m, "Frozen", role)})
    rows.append({"Frozen": "Trivial baselines", "Groups frozen": "", "Train images/s": "",
                 "Dev mean accuracy (%)": pct(((first or {}).get("dev") or {}).get("mean_baseline_all_absent_accuracy")),
                 **baseline_row(first, "Frozen")})
    rows.append({"Frozen": "Original study (reported)", "Groups frozen": "initial layers", "Train images/s": "",
                 "Dev mean accuracy (%)": "not reported", "Accuracy (%)": "'degrades performance considerably' (no numbers)",
                 "AUROC [95% CI]": "not reported", "AUPRC": "not reported"})
    frame = pd.DataFrame(rows).rename(columns={"Accuracy (%)": "Test mean accuracy (%)",
                                               "AUROC [95% CI]": "Test mean AUROC [95% CI]", "AUPRC": "Test mean AUPRC"})
    exp.tables.append(Table(exp.title_for(f"Freezing ablation: {stage1.model_label()}, stage 2 from stage 1, test split"),
                            frame, "Frozen BatchNorm layers keep their stage-1 statistics. Trivial baselines as in "
                                   "every table: 'absent' everywhere for accuracy, chance for AUROC."))
    exp.headline = {"freeze": {role: exp.runs[role].metrics().get("mean_auroc") for role, _ in variants}}
    return exp


# ---------------------------------------------------------------------------- data exploration
def label_counts(data: DataSpec) -> Table:
    """Positives and prevalence per label, per dataset and combined, with No Finding."""
    rows = []
    sets = data.datasets()
    for name in [*LABELS, NO_FINDING]:
        row = {"Finding": name}
        for ds in sets:
            f = ds.frame
            if name == NO_FINDING:
                y = f[list(LABELS)]
                pos = int(((y == 0).all(axis=1)).sum())
                known = int(y.notna().all(axis=1).sum())
            else:
                pos, known = int((f[name] == 1).sum()), int(f[name].notna().sum())
            row[f"{ds.name}: positives / labelled"] = f"{pos} / {known}"
            row[f"{ds.name}: prevalence (%)"] = pct(pos / known) if known else "n/a"
        rows.append(row)
    note = ("A Cardiomegaly-only set labels nothing else (NaN, masked in training). The trivial 'absent' "
            "accuracy of a label is 100 minus its prevalence.")
    return Table(title("Label frequencies", data.synthetic), pd.DataFrame(rows), note)


def dataset_overview(data: DataSpec) -> Table:
    rows = []
    for ds in data.datasets():
        f = ds.frame
        rows.append({"Dataset": ds.name, "Folder": display_path(ds.root), "Layout": ds.layout, "Images": len(f),
                     "Patients": int(f["patient_id"].nunique()), "Rows without an image": ds.rows_without_image,
                     "Official split": ", ".join(f"{k} {v}" for k, v in f["official_split"].value_counts().items()) or "none"})
    return Table(title("Datasets", data.synthetic), pd.DataFrame(rows))


def cooccurrence(data: DataSpec) -> pd.DataFrame:
    """Label co-occurrence counts (14 x 14) over images labelled for all 14 findings."""
    f = data.frame()
    y = f[list(LABELS)]
    y = y[y.notna().all(axis=1)].to_numpy(dtype=np.int64)
    return pd.DataFrame(y.T @ y, index=list(LABELS), columns=list(LABELS))


def demographics(data: DataSpec) -> list[Table]:
    """Age summary, sex and view counts (where the sources record them)."""
    f = data.frame()
    tables = []
    age = f.groupby("source")["age"].describe()[["count", "mean", "25%", "50%", "75%", "min", "max"]]
    age = age.reset_index().rename(columns={"source": "Dataset", "count": "Images with an age"})
    age["Images with an age"] = age["Images with an age"].astype(int)
    for col in ("mean", "25%", "50%", "75%", "min", "max"):
        age[col] = [num(v, 1) for v in age[col]]
    tables.append(Table(title("Patient age (years)", data.synthetic), age,
                        "n/a: the source records no age (the Cardiomegaly layout has none)."))
    for col, name in (("sex", "Sex"), ("view", "View position")):
        counts = f[col].fillna("not recorded").groupby(f["source"]).value_counts().unstack(fill_value=0)
        counts = counts.reset_index().rename(columns={"source": "Dataset"})
        tables.append(Table(title(name, data.synthetic), counts))
    return tables


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def plot_label_frequencies(data: DataSpec):
    f = data.frame()
    fig = _figure(9, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    pos = [(f[n] == 1).sum() for n in LABELS]
    known = [max(1, f[n].notna().sum()) for n in LABELS]
    ax.bar(range(len(LABELS)), [100 * p / k for p, k in zip(pos, known)], color="tab:blue")
    for i, p in enumerate(pos):
        ax.text(i, 0.5, str(p), ha="center", va="bottom", fontsize=7, color="white")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("prevalence among labelled images (%)")
    ax.set_title(title("Label frequencies (bars: %, inside: positives)", data.synthetic))
    fig.tight_layout()
    return fig


def plot_cooccurrence(data: DataSpec):
    c = cooccurrence(data)
    fig = _figure(8, 7)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(c.to_numpy(), cmap="viridis")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(LABELS)), LABELS, fontsize=8)
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(j, i, str(c.iat[i, j]), ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images with both findings")
    ax.set_title(title("Label co-occurrence (diagonal: positives)", data.synthetic))
    fig.tight_layout()
    return fig


def plot_demographics(data: DataSpec):
    f = data.frame()
    fig = _figure(12, 3.8)
    ax = fig.add_subplot(1, 3, 1)
    ages = f["age"].dropna()
    if len(ages):
        ax.hist(ages, bins=20, color="tab:blue")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("images")
    ax.set_title("Age" + ("" if len(ages) else " (not recorded)"))
    for i, (col, name) in enumerate((("sex", "Sex"), ("view", "View position")), start=2):
        ax = fig.add_subplot(1, 3, i)
        counts = f[col].fillna("not recorded").value_counts()
        ax.bar(counts.index.astype(str), counts.to_numpy(), color="tab:orange")
        ax.set_title(name)
    fig.suptitle(title("Demographics and views", data.synthetic))
    fig.tight_layout()
    return fig


def image_grid(data: DataSpec, per_finding: int = 4, size: int = 128, seed: int = 0):
    """A grid of example images: one row per finding (and No Finding), `per_finding` columns."""
    from common.cache import ImageCache

    f = data.frame()
    rng = np.random.default_rng(seed)
    rows = []
    for name in [NO_FINDING, *LABELS]:
        if name == NO_FINDING:
            mask = (f[list(LABELS)] == 0).all(axis=1)
        else:
            mask = f[name] == 1
        idx = np.flatnonzero(mask.to_numpy())
        pick = rng.choice(idx, size=min(per_finding, len(idx)), replace=False) if len(idx) else []
        rows.append((name, [f["path"].iat[i] for i in pick]))
    paths = [p for _, ps in rows for p in ps]
    cached = ImageCache(size).load(paths, progress=False) if paths else None
    where = {p: i for i, p in enumerate(paths)}
    fig = _figure(1.6 * per_finding + 1.6, 1.6 * len(rows))
    for r, (name, ps) in enumerate(rows):
        for c in range(per_finding):
            ax = fig.add_subplot(len(rows), per_finding, r * per_finding + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(ps) and cached is not None and cached.ok[where[ps[c]]]:
                ax.imshow(cached.images[where[ps[c]]], cmap="gray", vmin=0, vmax=255)
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title("Example images per finding", data.synthetic))
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def data_exploration(profile: str = "quick", smoke: bool = False, data_full=None, data_cardiomegaly=None) -> Experiment:
    """Tables of the data: datasets, label frequencies, demographics (plots: see plot_* / image_grid)."""
    data = resolve_data(data_full, data_cardiomegaly)
    exp = Experiment("data_exploration", "Data exploration", get_profile(profile, smoke).name, data)
    exp.tables.append(dataset_overview(data))
    exp.tables.append(label_counts(data))
    exp.tables.extend(demographics(data))
    return exp


# --------------------------------------------------------------------------------- run plots
def plot_curves(runs_: Mapping[str, RunRef], ttl: str):
    """Training curves of several runs: train / dev loss and dev mean AUROC per epoch."""
    fig = _figure(12, 4)
    axes = [fig.add_subplot(1, 2, i) for i in (1, 2)]
    seen = set()
    for i, (role, run) in enumerate(runs_.items()):
        if run.run_dir in seen:  # two roles of one run (e.g. backbones a profile trains alike)
            continue
        seen.add(run.run_dir)
        h = run.history()
        if h.empty:
            continue
        color = f"C{i % 10}"
        axes[0].plot(h["epoch"], h["train_loss"], "-o", color=color, label=f"{role}: train")
        axes[0].plot(h["epoch"], h["dev_loss"], "--s", color=color, label=f"{role}: dev")
        axes[1].plot(h["epoch"], h["dev_mean_auroc"], "-o", color=color, label=role)
    axes[0].set_title("loss (masked BCE)")
    axes[1].set_title("dev mean AUROC")
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="x-small")
    fig.suptitle(ttl)
    fig.tight_layout()
    return fig


def plot_test_roc(run: RunRef, ttl: str):
    """ROC curves per label of a run's test split (common.metrics.plot_roc)."""
    from common.metrics import plot_roc

    ts = held_out(run.run_dir)
    return plot_roc(ts.y_true, ts.y_prob, ts.labels, title=ttl)


def plot_chexnet_comparison(metrics: Mapping, ttl: str):
    """Per-label test AUROC (with 95% intervals) beside CheXNet's published values."""
    fig = _figure(11, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(LABELS))
    ours = [metrics["auroc"].get(n) for n in LABELS]
    ci = [metrics["auroc_ci"].get(n) for n in LABELS]
    vals = np.array([v if v is not None else np.nan for v in ours])
    err = np.array([[v - c[0], c[1] - v] if (v is not None and c) else [0, 0] for v, c in zip(ours, ci)]).T
    ax.bar(x - 0.2, vals, 0.4, yerr=err, capsize=2, label="ours (test, 95% CI)", color="tab:blue")
    ax.bar(x + 0.2, [CHEXNET_AUROC[n] for n in LABELS], 0.4, label="CheXNet (published)", color="tab:gray")
    ax.axhline(0.5, color="red", linestyle=":", linewidth=1, label="chance (0.5)")
    ax.set_xticks(x, LABELS, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC")
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(ttl)
    fig.tight_layout()
    return fig


def prediction_grid(run: RunRef, ttl: str, n: int = 8, size: int = 128, seed: int = 0):
    """A few test images with their true findings and the run's highest probabilities."""
    from common.cache import ImageCache

    ts = held_out(run.run_dir)
    if not len(ts.frame):
        return _figure(2, 2)
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(np.nansum(ts.y_true, axis=1) > 0)
    neg = np.flatnonzero(np.nansum(ts.y_true, axis=1) == 0)
    pick = list(rng.choice(pos, min(len(pos), n // 2), replace=False)) if len(pos) else []
    pick += list(rng.choice(neg, min(len(neg), n - len(pick)), replace=False)) if len(neg) else []
    paths = [ts.frame["path"].iat[i] for i in pick]
    cached = ImageCache(size).load(paths, progress=False)
    cols = min(4, len(pick)) or 1
    nrows = math.ceil(len(pick) / cols) or 1
    fig = _figure(3.4 * cols, 4.0 * nrows)
    for k, i in enumerate(pick):
        ax = fig.add_subplot(nrows, cols, k + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if cached.ok[k]:
            ax.imshow(cached.images[k], cmap="gray", vmin=0, vmax=255)
        truth = [lab for j, lab in enumerate(ts.labels) if ts.y_true[i, j] == 1] or ["none of these"]
        top = np.argsort(-ts.y_prob[i])[:3]
        pred = ", ".join(f"{ts.labels[j]} {ts.y_prob[i, j]:.2f}" for j in top)
        ax.set_title(f"true: {', '.join(truth)}\npredicted: {pred}", fontsize=7)
    fig.suptitle(ttl)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ results
def record_runs(record: Mapping) -> dict[str, RunRef]:
    """The runs of a saved experiment record whose folders still exist (role -> RunRef)."""
    out = {}
    for role, d in (record.get("runs") or {}).items():
        ref = RunRef.from_dict(d)
        if (ref.run_dir / runfiles.METRICS_JSON).is_file():
            out[role] = ref
    return out


def record_tables(record: Mapping) -> list[Table]:
    return [Table.from_dict(t) for t in record.get("tables", [])]


def headline_table(records: Mapping[str, Mapping]) -> Table:
    """The study's numbers beside ours, from the saved experiment records."""
    single = records.get("single_task", {}).get("headline", {})
    multi = records.get("multi_task", {}).get("headline", {})
    vit = records.get("transformer", {}).get("headline", {})
    synthetic = any(r.get("synthetic") for r in records.values())
    def both(h: Mapping, key: str) -> str:
        return f"{pct(h.get(f'cardiomegaly_before_{key}'))} -> {pct(h.get(f'cardiomegaly_after_{key}'))}" \
            if key == "accuracy" else f"{num(h.get('cardiomegaly_before_auroc'))} -> {num(h.get('cardiomegaly_after_auroc'))}"

    first = single or multi
    rows = [
        ("Stage 1: Cardiomegaly test accuracy (%)", f"{STUDY['stage1_accuracy']:.2f}",
         pct(single.get("stage1_accuracy")), pct(vit.get("stage1_accuracy")), pct(first.get("stage1_baseline_accuracy"))),
        ("Stage 1: Cardiomegaly test AUROC", "not reported", with_ci(single.get("stage1_auroc"), single.get("stage1_auroc_ci")),
         with_ci(vit.get("stage1_auroc"), vit.get("stage1_auroc_ci")), "0.500"),
        ("Stage 2: dev mean accuracy over 14 labels (%)", f"{STUDY['stage2_dev_mean_accuracy']:.2f}",
         pct(multi.get("stage2_dev_mean_accuracy")), pct(vit.get("stage2_dev_mean_accuracy")),
         pct(multi.get("stage2_dev_baseline_accuracy"))),
        ("Stage 2 without stage 1: dev mean accuracy (%)", f"{STUDY['stage2_without_stage1_dev_mean_accuracy']:.2f}",
         pct(multi.get("without_stage1_dev_mean_accuracy")), "not run (see the backbone ablation)",
         pct(multi.get("stage2_dev_baseline_accuracy"))),
        ("Cardiomegaly accuracy before -> after stage 2 (%)",
         f"{STUDY['stage1_accuracy']:.2f} -> {STUDY['cardiomegaly_after_stage2_accuracy']:.2f}",
         both(multi, "accuracy"), both(vit, "accuracy"), pct(multi.get("cardiomegaly_baseline_accuracy"))),
        ("Cardiomegaly AUROC before -> after stage 2", "not reported", both(multi, "auroc"), both(vit, "auroc"), "0.500"),
        ("Stage 2: test mean AUROC over 14 labels", f"not reported (CheXNet: {CHEXNET_MEAN_AUROC:.3f})",
         with_ci(multi.get("stage2_mean_auroc"), multi.get("stage2_mean_auroc_ci")),
         with_ci(vit.get("stage2_mean_auroc"), vit.get("stage2_mean_auroc_ci")), "0.500"),
    ]
    frame = pd.DataFrame(rows, columns=["Quantity", "Original study (reported)",
                                        f"Ours: {multi.get('model') or single.get('model') or 'n/a'}",
                                        f"Ours, ViT: {vit.get('model', 'n/a')}",
                                        "Trivial baseline ('absent' everywhere / chance)"])
    return Table(title("The study's numbers beside ours", synthetic), frame,
                 "The study's test numbers come from a hackathon leaderboard (labels unpublished) and its dev split "
                 "mixed patients; ours are on patient-wise splits of the data named in each table's header. The "
                 "trivial baseline is what predicting every finding absent scores on the same images (AUROC: chance).")
