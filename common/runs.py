"""A run is a directory. This module owns its layout, atomic writes and safe loading.

    RUN_DIR/
      config.json            everything needed to rebuild the model and repeat the run
      metrics.csv            one row per epoch (train loss, dev loss, dev mean AUROC / accuracy, lr)
      log.txt                the run's log (weights kept / dropped / new on --init-from, warnings)
      checkpoints/last.pt    model + optimiser + scheduler + RNG + epoch/step: what resume needs
      best.safetensors       model weights of the epoch with the best dev mean AUROC
      thresholds.json        per-label decision thresholds tuned on the dev split
      metrics.json           final test-split metrics (common.metrics)
      test_predictions.csv   `Image Index` + one probability column per label (what `evaluate` reads)

config.json keys:
  "model":  kwargs of `common.models.build_model` except `pretrained`
            (model_name, num_labels, head, in_chans, head_dropout, ...)
  "labels": the output order (a subset of common.labels.LABELS, in that order)
  "input":  {"image_size": int, "mean": [..], "std": [..], "in_chans": int}
  "train":  the training configuration, "data": the datasets used, "created", "version"

Checkpoints are written to a temporary file in the same folder and renamed, so a crash never
leaves a half-written file; they are read with `weights_only=True` or from safetensors, so a
checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS_CSV = "metrics.csv"
LOG = "log.txt"
LAST = "checkpoints/last.pt"
BEST = "best.safetensors"
THRESHOLDS = "thresholds.json"
METRICS_JSON = "metrics.json"
TEST_PREDICTIONS = "test_predictions.csv"


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run's files are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file + rename (the checkpoint is never half-written)."""
    import torch

    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def torch_load_safe(path: str | Path, map_location: str = "cpu") -> Any:
    """Load a torch checkpoint with weights_only=True: tensors and plain containers only."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError with long texts
        raise ValueError(
            f"{path}: cannot be loaded safely (weights_only=True): {str(err).splitlines()[0]}. "
            "Only checkpoints of tensors and plain Python containers are accepted."
        ) from None


def save_weights(state_dict: dict, path: str | Path) -> None:
    """Model weights as safetensors, written atomically."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(state))


def load_weights(path: str | Path) -> dict:
    """A state dict from .safetensors, or from a torch file (weights_only) holding one.

    A torch file may be a bare state dict or a checkpoint with a "model" / "state_dict" entry.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / BEST, *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.pt")),
                      *sorted(path.glob("*.pth")), *sorted(path.glob("*.bin"))]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no .safetensors, .pt, .pth or .bin weights file in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch_load_safe(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")


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


def read_thresholds(run_dir: str | Path, labels: list[str]) -> dict[str, float]:
    path = Path(run_dir) / THRESHOLDS
    if not path.is_file():
        return {name: 0.5 for name in labels}
    stored = load_json(path)
    return {name: float(stored.get(name, 0.5)) for name in labels}


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu") -> Run:
    """Rebuild a run's model from config.json and load its best (or last) weights."""
    from common.models import build_model

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model = build_model(**cfg["model"], pretrained=None)  # None: no random-init warning, weights load next
    if which == "best" and (run_dir / BEST).is_file():
        state = load_weights(run_dir / BEST)
    elif (run_dir / LAST).is_file():
        state = load_weights(run_dir / LAST)
    elif (run_dir / BEST).is_file():
        state = load_weights(run_dir / BEST)
    else:
        raise FileNotFoundError(f"{run_dir}: no weights ({BEST} or {LAST}); did training finish an epoch?")
    model.load_state_dict(state)
    model.to(device).eval()
    labels = list(cfg["labels"])
    return Run(run_dir, cfg, model, labels, read_thresholds(run_dir, labels))


def find_runs(root: str | Path) -> list[Path]:
    """Run directories below root (those with a config.json and weights), newest first.

    Newest by config.json, written when the run was made: the folder's own mtime moves whenever
    something is added to it (an export) or the run cache reuses it."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p.parent for p in root.rglob(CONFIG) if (p.parent / BEST).is_file() or (p.parent / LAST).is_file()]
    return sorted(runs, key=lambda p: (p / CONFIG).stat().st_mtime, reverse=True)
