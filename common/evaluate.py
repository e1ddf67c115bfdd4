"""Scoring a predictions CSV against a label file: what `medimaging evaluate` runs.

PREDICTIONS: a `common.serving.PREDICTIONS_IMAGE_COLUMN` column (`Image Index`: the image file
names; a path is reduced to its name) and one probability column per label, named as the label
(`Cardiomegaly`, as `medimaging predict --csv` and a run's test_predictions.csv write it) or
`prob_<label>` (`prob_Cardiomegaly`). Other columns are ignored.
LABELS: an NIH Data_Entry csv, a 14_train.csv, a cardiomegaly train/test csv or a dataset folder
(anything `common.data.load_labels` reads).

Which labels are evaluated:
- `label_names` (`--label NAME`, repeatable) or `task` (`--task cardiomegaly|all14`) name them;
  each must have a column.
- Otherwise the prediction columns decide, when they form a whole task: all 14 labels (a stage 2
  run) or Cardiomegaly alone (a stage 1 run). Any other subset is taken for a file with missing
  columns and is an error naming them; pass `--label` for each label to evaluate a custom subset.
Every image in PREDICTIONS must be in LABELS (images of LABELS without a prediction are fine: a
test split is a subset). Labels that LABELS does not annotate (NaN) are masked per label.

Every problem is an `EvaluationError` whose message says what to fix.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from common import runs
from common.data import DatasetError, load_labels
from common.labels import LABELS, TASKS
from common.metrics import evaluate_predictions
from common.serving import PREDICTIONS_IMAGE_COLUMN

# Accepted besides the bare label name: other tools write probability columns as prob_<label>.
PROB_PREFIX = "prob_"


class EvaluationError(ValueError):
    """Predictions, labels or thresholds that cannot be evaluated together (the message says why)."""


def short_list(names: Iterable, n: int = 5) -> str:
    """The first `n` names and how many there are, for error messages."""
    names = list(names)
    more = f" ... ({len(names)} in all)" if len(names) > n else f" ({len(names)})"
    return ", ".join(map(str, names[:n])) + more


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """(DataFrame indexed by image id, {label: column name}) from a predictions CSV."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: predictions file not found")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EvaluationError(f"{path}: not a readable CSV ({err})") from None
    if PREDICTIONS_IMAGE_COLUMN not in frame.columns:
        raise EvaluationError(f"{path}: no {PREDICTIONS_IMAGE_COLUMN!r} column (columns: {short_list(frame.columns)}); "
                              f"the first column must name each image, e.g. 00000001_000.png")
    columns: dict[str, str] = {}
    unknown = []
    for col in frame.columns:
        if col == PREDICTIONS_IMAGE_COLUMN:
            continue
        name = col.removeprefix(PROB_PREFIX)
        if name in LABELS:
            if name in columns:
                raise EvaluationError(f"{path}: label {name!r} has two columns ({columns[name]!r} and {col!r}); keep one")
            columns[name] = col
        elif col.startswith(PROB_PREFIX):
            unknown.append(col)
    if unknown:
        raise EvaluationError(f"{path}: probability column(s) for unknown labels: {short_list(unknown)}; "
                              f"labels are {', '.join(LABELS)}")
    # image ids are file names; a path in the column is reduced to its name
    ids = frame[PREDICTIONS_IMAGE_COLUMN].astype(str).map(lambda s: Path(s.strip()).name)
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise EvaluationError(f"{path}: images listed more than once: {short_list(dup)}")
    frame.index = pd.Index(ids, name="image_id")
    return frame, {name: columns[name] for name in LABELS if name in columns}


def choose_labels(found: list[str], label_names: list[str] | None, task: str | None, source: str) -> list[str]:
    """The labels to evaluate (in common.labels order), per the rules in this module's docstring."""
    if label_names and task:
        raise EvaluationError("give --label or --task, not both")
    if label_names or task:
        wanted = list(TASKS[task]) if task else list(label_names)
        bad = [n for n in wanted if n not in LABELS]
        if bad:
            raise EvaluationError(f"unknown label(s) {short_list(bad)}; labels are {', '.join(LABELS)}")
        missing = [n for n in wanted if n not in found]
        if missing:
            raise EvaluationError(f"{source}: no prediction column for {short_list(missing)} "
                                  f"(expected a column named as the label or {PROB_PREFIX}<label>)")
        return [n for n in LABELS if n in wanted]
    if not found:
        raise EvaluationError(f"{source}: no probability columns; expected one per label, named as the label "
                              f"(e.g. Cardiomegaly) or {PROB_PREFIX}<label>")
    for labels in TASKS.values():
        if set(found) == set(labels):
            return [n for n in LABELS if n in found]
    missing = [n for n in LABELS if n not in found]
    raise EvaluationError(
        f"{source}: prediction columns for {len(found)} of the {len(LABELS)} labels; missing: {short_list(missing)}. "
        f"A file should have all 14 (or Cardiomegaly alone); to evaluate just these, pass --label for each."
    )


def read_thresholds(path: str | Path, labels: list[str]) -> dict[str, float]:
    """The thresholds of `labels` from a thresholds JSON file or a run folder's; every label must
    have a number (unlike a run's own loading, which falls back to 0.5: here the user named the file)."""
    try:
        return runs.read_thresholds(path, labels, strict=True)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluationError(str(err)) from None


def _probabilities(frame: pd.DataFrame, columns: dict[str, str], names: list[str], source: str) -> np.ndarray:
    """[N, L] float64 probabilities of `names`; every value a number in [0, 1]."""
    prob = frame[[columns[n] for n in names]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    for j, name in enumerate(names):
        col = prob[:, j]
        bad = ~np.isfinite(col)
        if bad.any():
            raise EvaluationError(f"{source}: column {columns[name]!r} has {int(bad.sum())} empty or non-numeric "
                                  f"values (first at image {frame.index[np.argmax(bad)]})")
        if col.min() < 0 or col.max() > 1:
            raise EvaluationError(f"{source}: column {columns[name]!r} has values outside [0, 1] "
                                  f"({col.min():.3g} .. {col.max():.3g}); write probabilities (sigmoid of the logits)")
    return prob


def evaluate_files(predictions: str | Path, labels: str | Path, thresholds: str | Path | None = None,
                   label_names: list[str] | None = None, task: str | None = None, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """`common.metrics.evaluate_predictions` on a predictions CSV and a label file (see the module
    docstring), with a "sources" entry naming the three files."""
    frame, columns = read_predictions(predictions)
    names = choose_labels(list(columns), label_names, task, str(predictions))
    try:
        truth = load_labels(labels)
    except DatasetError as err:
        raise EvaluationError(f"--labels {labels}: {err}") from None
    unknown = frame.index[~frame.index.isin(truth.index)]
    if len(unknown):
        raise EvaluationError(f"{predictions}: {len(unknown)} of its {len(frame)} images are not in {labels}: "
                              f"{short_list(unknown)}. Are the predictions for this dataset?")
    if frame.empty:
        raise EvaluationError(f"{predictions}: no rows to evaluate")
    prob = _probabilities(frame, columns, names, str(predictions))
    y_true = truth.loc[frame.index, names].to_numpy(dtype=np.float64)
    thr = read_thresholds(thresholds, names) if thresholds else None
    result = evaluate_predictions(y_true, prob, names, thresholds=thr, n_boot=n_boot, seed=seed)
    result["sources"] = {"predictions": str(predictions), "labels": str(labels),
                         "thresholds": str(thresholds) if thresholds else None}
    return result
