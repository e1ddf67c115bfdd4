"""A run's train/dev/test split: stored by `fit` in RUN_DIR/split.csv, read back here.

    frame = run_split("runs/all14")               # image, path, patient, split + the 14 labels
    paths = split_paths("runs/all14", "test")     # the test images' paths, in the run's order

Everything that scores, calibrates or explains a run's held-out images (evaluation tables,
compression, int8 calibration, localisation) reads the split from here, so images added to a data
folder after training never slip into a run's test split. split.csv names each image once (its
`image_id`) with its patient and split, in the order `fit` used; paths and labels come from the
run's data folders, joined by image. Runs from before split.csv existed get their split
recomputed from their data folders exactly as `fit` made it (`common.data.task_split` with the
run's task, seed and fractions), with a note on stderr.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from common import runs
from common.data import combine, load_data, select_task, task_split
from common.labels import LABELS, task_of

# split.csv's columns; `run_split` adds the image path and the labels
IMAGE, PATIENT, SPLIT = "image", "patient", "split"
PATH = "path"
SPLITS = ("train", "dev", "test")


def write_split(run_dir: str | Path, frame: pd.DataFrame) -> None:
    """Store a run's split (rows with image_id, patient_id, split, as `common.data.task_split` gives)."""
    table = pd.DataFrame({IMAGE: frame["image_id"].astype(str).to_numpy(),
                          PATIENT: frame["patient_id"].astype(str).to_numpy(),
                          SPLIT: frame["split"].astype(str).to_numpy()})
    runs.atomic_write_text(Path(run_dir) / runs.SPLIT_CSV, table.to_csv(index=False))


def read_split(run_dir: str | Path) -> pd.DataFrame | None:
    """split.csv as stored (image, patient, split; strings), or None for a run without one."""
    path = Path(run_dir) / runs.SPLIT_CSV
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _data_roots(run_dir: Path, cfg: dict, data: Sequence[str | Path] | None) -> list[str]:
    """The run's data folders: `data` when given (the folders moved), else those `fit` loaded."""
    train = cfg.get("train") or {}
    roots = ([str(d) for d in data] if data else
             [d["root"] for d in cfg.get("data") or [] if isinstance(d, dict) and d.get("root")]
             or [str(d) for d in train.get("data") or []])
    if not roots:
        raise ValueError(f"{run_dir}: the run names no data folders; pass data=[...] (CLI --data) with the "
                         "folders it was trained on")
    missing = [r for r in roots if not Path(r).is_dir()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: the run's data folder(s) {missing} are gone; pass data=[...] "
                                "(CLI --data) with the folders it was trained on")
    return roots


def _task(run_dir: Path, cfg: dict) -> str:
    """The run's task: config.json["train"]["task"], else the task whose outputs are the run's labels."""
    task = (cfg.get("train") or {}).get("task") or task_of(cfg["labels"])
    if task is None:
        raise ValueError(f"{run_dir}: no task recorded and its labels {cfg['labels']} are no task's outputs")
    return task


def _recompute(run_dir: Path, cfg: dict, rows: pd.DataFrame) -> pd.DataFrame:
    """The split of a run from before split.csv: `fit`'s rule again, on the data as it is now."""
    print(f"{run_dir}: no {runs.SPLIT_CSV} (a run from before splits were stored); recomputing its split "
          "from its data folders, which is only right if they have not changed since", file=sys.stderr)
    train = cfg.get("train") or {}
    fractions = tuple(float(f) for f in train.get("split_fractions", (0.7, 0.1, 0.2)))
    frame, _ = task_split(rows, _task(run_dir, cfg), seed=int(train.get("seed", 49)), fractions=fractions,
                          folds=int(train.get("folds", 0)), fold=int(train.get("fold", 0)))
    return frame.rename(columns={"image_id": IMAGE, "patient_id": PATIENT})


def run_split(run_dir: str | Path, data: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """A run's images with their split: columns image, path, patient, split and the 14 labels
    (1 / 0 / NaN), one row per image in the order `fit` used (unreadable images included; the run
    lists those in unreadable.csv). `data`: the run's data folders, when they moved."""
    run_dir = Path(run_dir)
    cfg = runs.read_config(run_dir)
    combined = combine([load_data(r) for r in _data_roots(run_dir, cfg, data)]).frame
    stored = read_split(run_dir)
    if stored is None:
        frame = _recompute(run_dir, cfg, combined)
    else:
        # each image's row as the task's rule picks it among datasets holding it; an image whose
        # labels were edited out of the task since still has its row (and path) in the data
        rows, _ = select_task(combined, _task(run_dir, cfg))
        found = (pd.concat([rows, combined], ignore_index=True).drop_duplicates("image_id")
                 .drop(columns=["patient_id"]).rename(columns={"image_id": IMAGE}))
        frame = stored.merge(found, on=IMAGE, how="left", validate="one_to_one")
        gone = frame[PATH].isna()
        if gone.any():
            raise FileNotFoundError(
                f"{run_dir}: {int(gone.sum())} of the {len(frame)} images of its split are no longer in its data "
                f"folders (first: {', '.join(frame.loc[gone, IMAGE].head(3))}); pass data=[...] with the "
                "folders it was trained on")
    return frame[[IMAGE, PATH, PATIENT, SPLIT, *LABELS]].reset_index(drop=True)


def split_paths(run_dir: str | Path, split: str, data: Sequence[str | Path] | None = None) -> list[str]:
    """The image paths of one split ("train", "dev" or "test") of a run, in the run's order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    frame = run_split(run_dir, data)
    return frame.loc[frame[SPLIT] == split, PATH].astype(str).tolist()
