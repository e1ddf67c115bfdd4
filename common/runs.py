"""A run is a directory. This module owns its layout: the file names, reading a run back, and
loading a run's weights into a model (`load_run`, `init_from`).

    RUN_DIR/
      config.json            everything needed to rebuild the model and repeat the run
      metrics.csv            one row per epoch (train loss, dev loss, dev mean AUROC / accuracy, lr)
      log.txt                the run's log (weights kept / dropped / new on --init-from, warnings)
      checkpoints/last.pt    model + optimiser + scheduler + RNG + epoch/step: what resume needs
      best.safetensors       model weights of the epoch with the best dev mean AUROC
      thresholds.json        per-label decision thresholds tuned on the dev split
      metrics.json           final test-split metrics (common.metrics)
      test_predictions.csv   `Image Index` + one probability column per label (what `evaluate` reads)
      split.csv              image, patient, split: the run's train/dev/test split (common.splits reads it)
      unreadable.csv         path, reason: images the run skipped because they could not be decoded
      roc.png                the test split's ROC curves
      events.out.tfevents.*  TensorBoard scalars per epoch (when tensorboard is installed)

config.json keys:
  "model":  kwargs of `common.models.build_model` except `pretrained`
            (model_name, num_labels, head, in_chans, head_dropout, ...)
  "labels": the output order (a subset of common.labels.LABELS, in that order); empty for a
            pretraining run (`common.pretrain`: best.safetensors holds a backbone without a head),
            which is an `init_from` source and not a model to load or serve
  "input":  {"image_size": int, "mean": [..], "std": [..], "in_chans": int}
  "train":  the training configuration, "data": the datasets used, "created", "version"

Every file is written through `common.io` (a temporary file in the same folder, then renamed, so a
crash never leaves a half-written file); checkpoints are read with `weights_only=True` or from
safetensors, so a checkpoint from elsewhere cannot run code. The io helpers are re-exported here.
The model is imported inside `load_run` / `init_from` only: reading a run's files needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    load_json,
    load_weights,
    save_json,
    save_weights,
    torch_load_safe,
)

__all__ = [
    "CONFIG", "METRICS_CSV", "LOG", "LAST", "BEST", "THRESHOLDS", "METRICS_JSON", "TEST_PREDICTIONS", "SPLIT_CSV",
    "UNREADABLE_CSV", "ROC_PNG", "TENSORBOARD_EVENTS", "Run", "read_config", "read_thresholds", "weights_file", "load_run", "init_from",
    "find_runs",
    # re-exported from common.io, where they live
    "atomic_write_bytes", "atomic_write_text", "save_json", "load_json", "atomic_torch_save", "torch_load_safe",
    "save_weights", "load_weights",
]

CONFIG = "config.json"
METRICS_CSV = "metrics.csv"
LOG = "log.txt"
LAST = "checkpoints/last.pt"
BEST = "best.safetensors"
THRESHOLDS = "thresholds.json"
METRICS_JSON = "metrics.json"
TEST_PREDICTIONS = "test_predictions.csv"
SPLIT_CSV = "split.csv"
UNREADABLE_CSV = "unreadable.csv"
ROC_PNG = "roc.png"
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # a glob: TensorBoard names its event files itself


@dataclass
class Run:
    """A loaded run: the model in eval mode and what predicting with it needs."""

    run_dir: Path
    config: dict
    model: Any
    labels: list[str]
    thresholds: dict[str, float]

    @property
    def input(self) -> dict:
        return self.config["input"]


def read_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found (make one with `medimaging train --out {run_dir}`)")
    cfg = load_json(run_dir / CONFIG)
    for key in ("model", "labels", "input"):
        if key not in cfg:
            raise ValueError(f"{run_dir / CONFIG}: missing key {key!r}; is this a MedImaging run directory?")
    return cfg


def read_thresholds(path: str | Path, labels: list[str], strict: bool = False) -> dict[str, float]:
    """The per-label decision thresholds in thresholds.json (`path`: the file or a run folder).

    strict=False, a run loading its own: a missing file or label falls back to 0.5 (a run trained
    before thresholds were tuned). strict=True, a file the user named: a missing file raises
    FileNotFoundError, a missing label or a non-number ValueError, each naming the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / THRESHOLDS
    if not path.is_file() and not strict:
        return {name: 0.5 for name in labels}
    stored = load_json(path)
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: expected a JSON object label -> threshold")
    missing = [n for n in labels if n not in stored]
    if missing and strict:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ValueError(f"{path}: no threshold for {', '.join(missing[:4])}{more}")
    try:
        return {n: float(stored.get(n, 0.5)) for n in labels}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: thresholds must be numbers") from None


def weights_file(run_dir: str | Path, which: str = "best") -> Path:
    """The run's best.safetensors (which="best") or checkpoints/last.pt (which="last"), else the other."""
    run_dir = Path(run_dir)
    for name in ((BEST, LAST) if which == "best" else (LAST, BEST)):
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir}: no weights ({BEST} or {LAST}); did training finish an epoch?")


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu") -> Run:
    """Rebuild a run's model from config.json and load its best (or last) weights."""
    from common.models import (
        build_model,  # torch: reading a run's files alone does not need it
    )

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if not cfg["labels"]:
        raise ValueError(f"{run_dir}: a pretraining run (a backbone without a head) cannot predict; fine-tune it "
                         f"first: `medimaging train --init-from {run_dir} ...`")
    state = load_weights(weights_file(run_dir, which))
    model = build_model(**cfg["model"], pretrained=None)  # None: no random-init warning, weights load next
    model.load_state_dict(state)
    model.to(device).eval()
    labels = list(cfg["labels"])
    return Run(run_dir, cfg, model, labels, read_thresholds(run_dir, labels))


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in (CONFIG, BEST, LAST))


def source_input(source: str | Path) -> dict | None:
    """config.json["input"] of an `init_from` source that is a run directory (None for a weights file)."""
    source = Path(source)
    if _is_run_dir(source) and (source / CONFIG).is_file():
        return load_json(source / CONFIG).get("input") or None
    return None


def init_from(model, source: str | Path) -> dict:
    """Initialise a model's backbone from a run directory or a weights file; the head stays fresh.

    The stage 1 -> stage 2 step and the study's "medical pretraining": weights whose names and
    shapes match are loaded (a plain timm checkpoint of the same architecture works too), the head
    is not. A run directory gives its best.safetensors, else checkpoints/last.pt; a folder that is
    not a run gives the weights file inside it. Returns {"kept", "dropped", "new"}: lists of weight
    names for the run log.
    """
    from common.models import load_backbone_state  # torch: see load_run

    source = Path(source)
    if _is_run_dir(source):
        path = weights_file(source)
    elif source.exists():
        path = source
    else:
        raise FileNotFoundError(f"{source}: no such run directory or weights file")
    try:
        return load_backbone_state(model, load_weights(path), source=str(path))
    except ValueError as err:
        if (source / CONFIG).is_file() and "matches only" in str(err):
            other = (load_json(source / CONFIG).get("model") or {}).get("model_name")
            raise ValueError(f"{err} (that run used model_name={other!r})") from None
        raise


def _has_head(config_path: Path) -> bool:
    """False for a pretraining run's config.json (no labels); an unreadable one counts as a run."""
    try:
        labels = load_json(config_path).get("labels")
    except (OSError, ValueError, AttributeError):
        return True
    return labels is None or bool(labels)


def find_runs(root: str | Path) -> list[Path]:
    """Run directories below root (those with a config.json and weights), newest first; pretraining
    runs (no head, nothing to predict with) are not listed.

    Newest by config.json, written when the run was made: the folder's own mtime moves whenever
    something is added to it (an export) or the run cache reuses it."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p.parent for p in root.rglob(CONFIG)
            if ((p.parent / BEST).is_file() or (p.parent / LAST).is_file()) and _has_head(p)]
    return sorted(runs, key=lambda p: (p / CONFIG).stat().st_mtime, reverse=True)
