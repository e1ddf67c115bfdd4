"""`medimaging evaluate`: score a predictions CSV against a label file.

    medimaging evaluate --predictions runs/stage2/test_predictions.csv \\
        --labels dataset_full/Data_Entry_2017_v2020.csv --json runs/stage2/eval.json \\
        --thresholds runs/stage2/thresholds.json

PREDICTIONS: an `Image Index` column and one probability column per label, named as the label
(`Cardiomegaly`) or `prob_<label>` (`prob_Cardiomegaly`). Other columns are ignored.
LABELS: an NIH Data_Entry csv, a 14_train.csv, a cardiomegaly train/test csv or a dataset folder
(anything `common.data.load_labels` reads).

Which labels are evaluated:
- `--label NAME` (repeatable) or `--task cardiomegaly|all14` name them; each must have a column.
- Otherwise the prediction columns decide, when they form a whole task: all 14 labels (a stage 2
  run) or Cardiomegaly alone (a stage 1 run). Any other subset is taken for a file with missing
  columns and is an error naming them; pass `--label` for each label to evaluate a custom subset.
Every image in PREDICTIONS must be in LABELS (images of LABELS without a prediction are fine: a
test split is a subset). Labels that LABELS does not annotate (NaN) are masked per label.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.commands._types import non_negative_int

HELP = "score a predictions CSV (Image Index + one probability per label) against a label file"

IMAGE_COLUMN = "Image Index"
PROB_PREFIX = "prob_"


class EvaluationError(ValueError):
    """Predictions, labels or thresholds that cannot be evaluated together (the message says why)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from common.labels import TASKS

    p.add_argument("--predictions", required=True, metavar="P.csv",
                   help=f"CSV with an {IMAGE_COLUMN!r} column and one probability column per label "
                        f"(named as the label or {PROB_PREFIX}<label>)")
    p.add_argument("--labels", required=True, metavar="L",
                   help="NIH Data_Entry csv, 14_train.csv, cardiomegaly csv or dataset folder")
    p.add_argument("--json", metavar="OUT", default=None, help="write all metrics to this JSON file")
    p.add_argument("--thresholds", metavar="T.json", default=None,
                   help="per-label thresholds for sensitivity/specificity/F1 (e.g. a run's thresholds.json; default 0.5)")
    p.add_argument("--label", dest="label_names", action="append", metavar="NAME", default=None,
                   help="evaluate this label (repeatable); each must have a prediction column")
    p.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="evaluate this task's labels (cardiomegaly: Cardiomegaly only; all14: the 14 findings)")
    p.add_argument("--n-boot", type=non_negative_int, default=1000, metavar="N", help="bootstrap resamples for AUROC CIs (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")


def _first(names, n: int = 5) -> str:
    names = list(names)
    more = f" ... ({len(names)} in all)" if len(names) > n else f" ({len(names)})"
    return ", ".join(map(str, names[:n])) + more


def read_predictions(path: str | Path):
    """(DataFrame indexed by image id, {label: column name}) from a predictions CSV."""
    import pandas as pd

    from common.labels import LABELS

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: predictions file not found")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EvaluationError(f"{path}: not a readable CSV ({err})") from None
    if IMAGE_COLUMN not in frame.columns:
        raise EvaluationError(f"{path}: no {IMAGE_COLUMN!r} column (columns: {_first(frame.columns)}); the "
                              f"first column must name each image, e.g. 00000001_000.png")
    columns: dict[str, str] = {}
    unknown = []
    for col in frame.columns:
        if col == IMAGE_COLUMN:
            continue
        name = col[len(PROB_PREFIX):] if col.startswith(PROB_PREFIX) else col
        if name in LABELS:
            if name in columns:
                raise EvaluationError(f"{path}: label {name!r} has two columns ({columns[name]!r} and {col!r}); keep one")
            columns[name] = col
        elif col.startswith(PROB_PREFIX):
            unknown.append(col)
    if unknown:
        raise EvaluationError(f"{path}: probability column(s) for unknown labels: {_first(unknown)}; "
                              f"labels are {', '.join(LABELS)}")
    # image ids are file names; a path in the column is reduced to its name
    ids = frame[IMAGE_COLUMN].astype(str).map(lambda s: Path(s.strip()).name)
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise EvaluationError(f"{path}: images listed more than once: {_first(dup)}")
    frame.index = pd.Index(ids, name="image_id")
    return frame, {name: columns[name] for name in LABELS if name in columns}


def choose_labels(found: list[str], label_names: list[str] | None, task: str | None, source: str) -> list[str]:
    """The labels to evaluate (in common.labels order), per the rules in this module's docstring."""
    from common.labels import LABELS, TASKS

    if label_names and task:
        raise EvaluationError("give --label or --task, not both")
    if label_names or task:
        wanted = list(TASKS[task]) if task else list(label_names)
        bad = [n for n in wanted if n not in LABELS]
        if bad:
            raise EvaluationError(f"unknown label(s) {_first(bad)}; labels are {', '.join(LABELS)}")
        missing = [n for n in wanted if n not in found]
        if missing:
            raise EvaluationError(f"{source}: no prediction column for {_first(missing)} "
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
        f"{source}: prediction columns for {len(found)} of the {len(LABELS)} labels; missing: {_first(missing)}. "
        f"A file should have all 14 (or Cardiomegaly alone); to evaluate just these, pass --label for each."
    )


def read_thresholds(path: str | Path, labels: list[str]) -> dict[str, float]:
    from common.runs import load_json

    path = Path(path)
    if path.is_dir():
        path = path / "thresholds.json"
    try:
        stored = load_json(path)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluationError(str(err)) from None
    if not isinstance(stored, dict):
        raise EvaluationError(f"{path}: expected a JSON object label -> threshold")
    missing = [n for n in labels if n not in stored]
    if missing:
        raise EvaluationError(f"{path}: no threshold for {_first(missing)}")
    try:
        return {n: float(stored[n]) for n in labels}
    except (TypeError, ValueError):
        raise EvaluationError(f"{path}: thresholds must be numbers") from None


def evaluate_files(predictions: str | Path, labels: str | Path, thresholds: str | Path | None = None,
                   label_names: list[str] | None = None, task: str | None = None, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """`common.metrics.evaluate_predictions` on a predictions CSV and a label file (see module doc)."""
    import numpy as np
    import pandas as pd

    from common.data import DatasetError, load_labels
    from common.metrics import evaluate_predictions

    frame, columns = read_predictions(predictions)
    names = choose_labels(list(columns), label_names, task, str(predictions))
    try:
        truth = load_labels(labels)
    except DatasetError as err:
        raise EvaluationError(f"--labels {labels}: {err}") from None
    unknown = frame.index[~frame.index.isin(truth.index)]
    if len(unknown):
        raise EvaluationError(f"{predictions}: {len(unknown)} of its {len(frame)} images are not in {labels}: "
                              f"{_first(unknown)}. Are the predictions for this dataset?")
    if frame.empty:
        raise EvaluationError(f"{predictions}: no rows to evaluate")
    prob = frame[[columns[n] for n in names]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    for j, name in enumerate(names):
        col = prob[:, j]
        bad = ~np.isfinite(col)
        if bad.any():
            raise EvaluationError(f"{predictions}: column {columns[name]!r} has {int(bad.sum())} empty or non-numeric "
                                  f"values (first at image {frame.index[np.argmax(bad)]})")
        if col.min() < 0 or col.max() > 1:
            raise EvaluationError(f"{predictions}: column {columns[name]!r} has values outside [0, 1] "
                                  f"({col.min():.3g} .. {col.max():.3g}); write probabilities (sigmoid of the logits)")
    y_true = truth.loc[frame.index, names].to_numpy(dtype=np.float64)
    thr = read_thresholds(thresholds, names) if thresholds else None
    result = evaluate_predictions(y_true, prob, names, thresholds=thr, n_boot=n_boot, seed=seed)
    result["sources"] = {"predictions": str(predictions), "labels": str(labels),
                         "thresholds": str(thresholds) if thresholds else None}
    return result


def run(args: argparse.Namespace) -> int:
    from common.runs import save_json

    try:
        result = evaluate_files(args.predictions, args.labels, args.thresholds, args.label_names, args.task,
                                n_boot=args.n_boot, seed=args.seed)
    except (EvaluationError, FileNotFoundError) as err:
        print(f"medimaging evaluate: error: {err}", file=sys.stderr)
        return 2
    from common.metrics import format_table

    unlabelled = [n for n in result["labels"] if result["n_labelled"][n] == 0]
    print(f"{result['n_images']} images, {len(result['labels'])} label(s); predictions {args.predictions}, "
          f"labels {args.labels}")
    print(format_table(result))
    if unlabelled:
        print(f"note: {args.labels} does not label {_first(unlabelled)} for these images: n/a above")
    if args.json:
        save_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
