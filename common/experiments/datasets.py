"""Data specs: which folders an experiment uses, their identity in run keys, and how headers name them."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.data import combine, default_data_dirs, detect_layout, label_files, load_data
from common.paths import DATASET_CARDIOMEGALY, DATASET_FULL, REPO_ROOT, find_data_dir, has_data


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
                            for name, size, mtime in label_files(root)]}


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
        return combine(self.datasets()).frame

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


def is_cardiomegaly_layout(folder: Path) -> bool:
    """Whether a folder is in the Cardiomegaly vs No Finding layout (train/ test/ train.csv test.csv)."""
    return detect_layout(folder)[0] == "cardiomegaly"


def resolve_data(data_full: str | Path | None = None, data_cardiomegaly: str | Path | None = None) -> DataSpec:
    """The folders to use. None means `dataset_full/` / `dataset_cardiomegaly/` (from the working
    directory upwards) when they hold data; when neither given nor found, the synthetic default."""
    if data_full is None and data_cardiomegaly is None:
        dirs, synthetic = default_data_dirs()
        full = cardio = None
        for d in dirs:
            d = Path(d).resolve()
            if is_cardiomegaly_layout(d):
                cardio = d
            else:
                full = d
        return DataSpec(full, cardio, bool(synthetic))
    full = Path(data_full).expanduser().resolve() if data_full is not None else None
    cardio = Path(data_cardiomegaly).expanduser().resolve() if data_cardiomegaly is not None else None
    if full is None and has_data(find_data_dir(DATASET_FULL)):
        full = find_data_dir(DATASET_FULL)
    if cardio is None and has_data(find_data_dir(DATASET_CARDIOMEGALY)):
        cardio = find_data_dir(DATASET_CARDIOMEGALY)
    specs = [load_data(p) for p in (full, cardio) if p is not None]  # a clear error for a bad folder
    return DataSpec(full, cardio, any(bool(getattr(s, "is_synthetic", False)) for s in specs))


def display_path(path: str | Path) -> str:
    """A data folder as table headers show it: relative to the checkout when it sits beside it
    (../shared/data/nih-sample), under ~ when in the home folder, else absolute."""
    p = Path(path).resolve()
    rel = os.path.relpath(p, REPO_ROOT)
    if not rel.startswith(os.pardir + os.sep + os.pardir):
        return rel
    with contextlib.suppress(ValueError, RuntimeError):
        return "~/" + str(p.relative_to(Path.home()))
    return str(p)


def title(text: str, synthetic: bool) -> str:
    """A table or plot title that says SYNTHETIC when the data is."""
    return f"SYNTHETIC DATA - {text}" if synthetic else text

