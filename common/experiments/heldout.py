"""A run's held-out test split: its rows, labels and predicted probabilities, aligned."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import runs as runfiles
from common.serving import PREDICTIONS_IMAGE_COLUMN
from common.splits import IMAGE, SPLIT, run_split


@dataclass
class HeldOut:
    """A run's test split: its rows, labels and predicted probabilities, aligned."""

    frame: pd.DataFrame
    labels: list[str]
    y_true: np.ndarray
    y_prob: np.ndarray
    thresholds: dict[str, float]


def held_out(run_dir: str | Path) -> HeldOut:
    """The run's test_predictions.csv joined row by row with the labels of its split (`common.splits`)."""
    run_dir = Path(run_dir)
    cfg = runfiles.read_config(run_dir)
    labels = list(cfg["labels"])
    frame = run_split(run_dir)
    unreadable_csv = run_dir / runfiles.UNREADABLE_CSV
    test = frame[frame[SPLIT] == "test"]
    if unreadable_csv.is_file():
        bad = set(pd.read_csv(unreadable_csv)["path"].astype(str))
        test = test[~test["path"].isin(bad)]
    pred = pd.read_csv(run_dir / runfiles.TEST_PREDICTIONS, dtype={PREDICTIONS_IMAGE_COLUMN: str})
    if len(pred) != len(test) or not (pred[PREDICTIONS_IMAGE_COLUMN].to_numpy() == test[IMAGE].to_numpy()).all():
        raise ValueError(
            f"{run_dir / runfiles.TEST_PREDICTIONS}: its {len(pred)} rows do not line up with the {len(test)} test "
            "images of its split; the run folder is incomplete or was edited. Delete the run folder to retrain."
        )
    return HeldOut(test.reset_index(drop=True), labels, test[labels].to_numpy(dtype=np.float64),
                   pred[labels].to_numpy(dtype=np.float64), runfiles.read_thresholds(run_dir, labels))

