"""Datasets: one contract over the three real layouts, combined datasets and patient splits.

A dataset is an `XrayData` whose `frame` has one row per image that exists on disk:

    image_id   file name, e.g. "00000001_000.png"
    path       absolute path (str)
    patient_id str; NIH patients as 8 digits ("00000001"), so the same patient matches across layouts
    source     the dataset's name
    <14 label columns, common.labels.LABELS order>  float32 1 / 0 / NaN (NaN = not labelled here)
    age, sex, view          when the source has them (NIH layout), else NaN
    official_split          'trainval' / 'test' / NaN (NIH's lists; the cardiomegaly layout's folders)

Layouts (detected automatically):
    "nih"           Data_Entry_2017_v2020.csv or Data_Entry_2017.csv, images anywhere below
                    (images_001/images/..., images/...), optional train_val_list.txt / test_list.txt
    "full"          the original project's dataset_full: 14_train.csv, images anywhere below
    "cardiomegaly"  the original project's dataset_cardiomegaly: train/ test/ train.csv test.csv
                    (imageID,disease); a test csv without labels is an unlabelled set

Which folders to use when none are given: `default_data_dirs` (dataset_full/ and
dataset_cardiomegaly/, found by `common.paths.find_data_dir`, else the synthetic default).
`summarize` is what `medimaging data summary` reports.

Rows, not datasets, fail: a row with a finding outside the 14 keeps its known findings; a row that
is malformed (a missing value, empty labels, more fields than the header, a non-numeric NIH
Patient ID, a label that is not 0/1, an image listed twice, a name that is a folder) is skipped.
Each is a `RowProblem` (file, line, image, kind, reason) in `XrayData.problems`; strict mode
(`--strict`, $MEDIMAGING_STRICT_LABELS=1) refuses such a file instead. Only a file without any
usable row stops a dataset. The label files themselves are read by `common.labelfiles` (its names
are importable from here as before); this module adds the images, the datasets and the splits.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.cache import ImageCache
from common.images import IMAGE_EXTENSIONS
from common.labelfiles import (
    CARDIO_CSVS,
    FOLDER_NOT_IMAGE,
    FULL_CSV,
    KEPT,
    LAYOUT_HELP,
    NIH_CSVS,
    SKIPPED,
    DatasetError,
    RowIssues,
    RowProblem,
    detect_layout,
    load_labels,
    problem_counts,
    problems_line,
    raise_if_strict,
    read_cardio_table,
    read_full_table,
    read_nih_table,
    strict_default,
)
from common.labels import LABELS, TASKS
from common.paths import DATASET_CARDIOMEGALY, DATASET_FULL, find_data_dir, has_data
from common.synthetic import SYNTHETIC_MARKER, ensure_default

__all__ = [
    "XrayData", "index_images", "load_dataset", "combine", "summarize", "select_task", "task_split",
    "patient_split", "patient_folds", "default_data_dirs",
    # the label files' names, from common.labelfiles, where they live
    "NIH_CSVS", "FULL_CSV", "CARDIO_CSVS", "LAYOUT_HELP", "DatasetError", "RowProblem", "detect_layout",
    "load_labels", "problem_counts", "problems_line", "strict_default",
]

@dataclass
class XrayData:
    """A dataset: `frame` (one row per existing image), where it came from and what was missing."""

    frame: pd.DataFrame
    root: Path | None
    layout: str  # "nih", "full", "cardiomegaly" or "combined"
    rows_without_image: int = 0
    name: str = ""
    is_synthetic: bool = False
    missing_ids: list[str] = field(default_factory=list, repr=False)
    problems: list[RowProblem] = field(default_factory=list, repr=False)

    @property
    def labels(self) -> np.ndarray:
        """(N, 14) float32 label matrix in LABELS order (NaN = not labelled)."""
        return self.frame[list(LABELS)].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.frame)



# ------------------------------------------------------------------------------------- images
def _scan_images(root: str | Path) -> tuple[dict[str, str], set[str]]:
    """(file name -> absolute path of every image file below `root`, names of folders named like an
    image file) in one os.scandir walk; see `index_images`."""
    root = Path(root).resolve()
    found: dict[str, str] = {}
    folders: set[str] = set()
    stack = [str(root)]
    seen: set[tuple[int, int]] = set()  # (device, inode) of visited folders: symlink loops end here
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            image_name = os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            if e.is_dir(follow_symlinks=True):
                subdirs.append(e.path)
                if image_name:
                    folders.add(e.name)
            elif image_name and e.name not in found:
                found[e.name] = e.path
        stack.extend(reversed(subdirs))  # depth-first in sorted order
    return found, folders - set(found)


def index_images(root: str | Path) -> dict[str, str]:
    """Map file name → absolute path for every image file below `root` (one os.scandir walk).

    Hidden folders are skipped. When a name occurs twice the first in sorted folder order wins.
    """
    return _scan_images(root)[0]


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}



def _attach_paths(table: pd.DataFrame, issues: RowIssues, files: dict[str, str],
                  folders: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """(rows whose image file exists, with its `path`; image names of the rows without one). A row
    naming a folder instead of an image file is a problem of its own, not a missing image."""
    paths = table["image_id"].map(files)
    has = paths.notna().to_numpy()
    folder = ~has & table["image_id"].isin(folders).to_numpy()
    if folder.any():
        issues.add(table["_row"].to_numpy()[folder], FOLDER_NOT_IMAGE,
                   "names a folder, not an image file (the image may be inside it, under another name)")
    missing = table.loc[~has & ~folder, "image_id"].tolist()
    out = table.loc[has].drop(columns="_row")
    out.insert(1, "path", paths[has].to_numpy(dtype=object))
    return out, missing


def _official_split(root: Path, frame: pd.DataFrame) -> None:
    """NIH's train_val_list.txt / test_list.txt, when present, as the `official_split` column."""
    tv, te = root / "train_val_list.txt", root / "test_list.txt"
    if tv.is_file() or te.is_file():
        split = pd.Series(np.nan, index=frame.index, dtype=object)
        if tv.is_file():
            split[frame["image_id"].isin(_read_list(tv))] = "trainval"
        if te.is_file():
            split[frame["image_id"].isin(_read_list(te))] = "test"
        frame["official_split"] = split


def _read_cardio(root: Path) -> tuple[pd.DataFrame, list[str], int, list[RowProblem]]:
    parts, missing, total, problems = [], [], 0, []
    for split_name, official in (("train", "trainval"), ("test", "test")):
        csv = root / f"{split_name}.csv"
        if not csv.is_file():
            continue
        table, issues = read_cardio_table(csv)
        total += len(issues.ids) + len(issues.bad_lines)
        folder = root / split_name
        files, folders = _scan_images(folder) if folder.is_dir() else ({}, set())
        if not files and len(table):
            raise DatasetError(
                f"{folder}: no images found for the {len(table)} rows of {csv.name}.\n{LAYOUT_HELP}"
            )
        part, miss = _attach_paths(table, issues, files, folders)
        part["official_split"] = official
        parts.append(part)
        missing += miss
        problems += issues.problems()
    return pd.concat(parts, ignore_index=True), missing, total, problems


def _finish(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    frame = frame.reset_index(drop=True)
    frame["source"] = name
    cols = ["image_id", "path", "patient_id", "source", *LABELS]
    for extra in ("age", "sex", "view", "official_split"):
        if extra not in frame:
            frame[extra] = np.float32(np.nan) if extra == "age" else pd.Series([np.nan] * len(frame), dtype=object)
        cols.append(extra)
    frame = frame[cols + [c for c in frame.columns if c not in cols]]
    frame["age"] = frame["age"].astype(np.float32)
    return frame


def _report(name: str, root: Path, csv_name: str, n_found: int, missing: list[str], total: int,
            problems: list[RowProblem]) -> None:
    if missing:
        print(f"{name}: {n_found} images found, {len(missing)} of the {total} rows of "
              f"{csv_name} have no image file (skipped)", file=sys.stderr)
    if problems:
        print(problems_line(problems, name), file=sys.stderr)
        for p in problems[:3]:
            print(f"  {p}", file=sys.stderr)
        print(f"  (`medimaging data summary {root}` lists every one)", file=sys.stderr)


def load_dataset(root: str | Path, name: str | None = None, quiet: bool = False,
                 strict: bool | None = None) -> XrayData:
    """Read a dataset folder in any of the three layouts (see the module docstring).

    Rows whose image file is absent are dropped and counted in `rows_without_image`. Rows that
    cannot be used as written are kept with what is usable or skipped, and listed in `problems`
    (`RowProblem`: file, line, image, kind, reason); strict=True (default: $MEDIMAGING_STRICT_LABELS)
    refuses the dataset instead. A DatasetError only when no usable row remains. Unless `quiet`, a
    summary goes to stderr.
    """
    root = Path(root).expanduser().resolve()
    layout, csv_path = detect_layout(root)
    name = name or root.name
    if layout == "cardiomegaly":
        frame, missing, total, problems = _read_cardio(root)
    else:
        table, issues = read_nih_table(csv_path) if layout == "nih" else read_full_table(csv_path)
        frame, missing = _attach_paths(table, issues, *_scan_images(root))
        if layout == "nih":
            _official_split(root, frame)
        total = len(issues.ids) + len(issues.bad_lines)
        problems = issues.problems()
    raise_if_strict(problems, strict_default(strict))
    if total and len(frame) == 0:
        if missing:
            raise DatasetError(
                f"{root}: none of the {len(missing)} images listed in {csv_path.name} were found below the folder "
                f"(e.g. {missing[0]!r}).\n{LAYOUT_HELP}"
            )
        raise DatasetError(f"{root}: no usable row in {csv_path.name}: every one of its {total} rows has a "
                           f"problem, e.g.\n  " + "\n  ".join(str(p) for p in problems[:5]))
    if not quiet:
        _report(name, root, csv_path.name, len(frame), missing, total, problems)
    return XrayData(
        frame=_finish(frame, name), root=root, layout=layout, rows_without_image=len(missing),
        name=name, is_synthetic=(root / SYNTHETIC_MARKER).is_file(), missing_ids=missing, problems=problems,
    )


@functools.lru_cache(maxsize=32)
def _load_dataset_cached(root: str, stamp: tuple, strict: bool) -> XrayData:
    return load_dataset(root, quiet=True, strict=strict)


def label_files(root: Path) -> tuple:
    """(name, size, mtime_ns) of the label files at the top of a dataset folder."""
    out = []
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in (".csv", ".txt", ".json"):
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_data(root: str | Path) -> XrayData:
    """`load_dataset(root)`, memoised while its label files (and the strict mode,
    $MEDIMAGING_STRICT_LABELS) are unchanged: what everything that reads a folder again and again
    (run keys, a run's split, the experiments' tables) uses."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (give a folder in the NIH, dataset_full or "
                           "dataset_cardiomegaly layout; see dataset_full/README.md)")
    return _load_dataset_cached(str(root), label_files(root), strict_default(None))



def combine(datasets: Sequence[XrayData]) -> XrayData:
    """Concatenate datasets (rows keep their `source`); one dataset is returned unchanged."""
    datasets = list(datasets)
    if not datasets:
        raise ValueError("combine() needs at least one dataset")
    if len(datasets) == 1:
        return datasets[0]
    frame = pd.concat([d.frame for d in datasets], ignore_index=True)
    frame["age"] = frame["age"].astype(np.float32)
    return XrayData(
        frame=frame, root=None, layout="combined",
        rows_without_image=sum(d.rows_without_image for d in datasets),
        name="+".join(d.name for d in datasets),
        is_synthetic=any(d.is_synthetic for d in datasets),
        missing_ids=[m for d in datasets for m in d.missing_ids],
        problems=[p for d in datasets for p in d.problems],
    )


def summarize(dirs: Sequence[str | Path], size: int = 224, workers: int | None = None, progress: bool = True,
              strict: bool | None = None) -> dict:
    """What one or more dataset folders (combined) hold, as a JSON-able dict: dataset, layout,
    is_synthetic, images_found, rows_without_image, unreadable ([{path, reason}]), patients,
    positives (label -> count), labelled (label -> images with a known label), rows_skipped and
    rows_kept_with_unknown_findings (label rows with a problem), problem_counts (kind -> rows) and problems ([{file, line, image, kind, reason, action}], every label row that
    was kept with only its known findings or skipped; see `RowProblem`).

    Every image is decoded through the image cache at `size`, which finds the unreadable ones and
    leaves the work for training to reuse. strict: see `load_dataset`.
    """
    data = combine([load_dataset(d, quiet=True, strict=strict) for d in dirs])
    frame = data.frame
    cached = ImageCache(size).load(frame["path"].tolist(), workers=workers, progress=progress)
    values = frame[list(LABELS)].to_numpy(dtype=np.float32)
    return {
        "dataset": data.name,
        "layout": data.layout,
        "is_synthetic": bool(data.is_synthetic),
        "images_found": int(len(frame)),
        "rows_without_image": int(data.rows_without_image),
        "unreadable": [{"path": p, "reason": r} for p, r in cached.unreadable],
        "patients": int(frame["patient_id"].nunique()),
        "positives": {name: int(np.nansum(values[:, i] == 1)) for i, name in enumerate(LABELS)},
        "labelled": {name: int(np.sum(~np.isnan(values[:, i]))) for i, name in enumerate(LABELS)},
        "rows_skipped": sum(p.action == SKIPPED for p in data.problems),
        "rows_kept_with_unknown_findings": sum(p.action == KEPT for p in data.problems),
        "problem_counts": problem_counts(data.problems),
        "problems": [p.to_dict() for p in data.problems],
    }


def select_task(frame: pd.DataFrame, task: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows and output labels of a task.

    'cardiomegaly': rows whose Cardiomegaly label is known; rows that also carry other labels
    (multi-label sources such as NIH) only when they are Cardiomegaly or No Finding, as in the
    study's binary set. 'all14': every row with at least one known label (NaN-masked in the loss).
    An image found in several datasets (same `image_id`) is kept once: the row with most known
    labels, so no image is trained on twice or predicted twice.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {sorted(TASKS)}")
    labels = list(TASKS[task])
    y = frame[list(LABELS)]
    if task == "cardiomegaly":
        cardio = y["Cardiomegaly"]
        multi_label = y.drop(columns="Cardiomegaly").notna().any(axis=1)
        no_finding = (y == 0).all(axis=1)
        keep = cardio.notna() & (~multi_label | (cardio == 1) | no_finding)
    else:
        keep = y[labels].notna().any(axis=1)
    frame = frame.loc[keep]
    most_known_first = frame[list(LABELS)].notna().sum(axis=1).sort_values(ascending=False, kind="stable")
    unique = frame.loc[most_known_first.index].drop_duplicates("image_id").index.sort_values()
    return frame.loc[unique].reset_index(drop=True), labels


def task_split(frame: pd.DataFrame, task: str, seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2),
               folds: int = 0, fold: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """A task's rows (`select_task`) with a 'split' column from `patient_split` (or, with `folds`,
    `patient_folds`): the split `fit` makes. Returns (rows, output labels); no rows gives an empty
    frame, not an error."""
    rows, labels = select_task(frame, task)
    if not len(rows):
        rows["split"] = []
    elif folds:
        # folds are dealt over every labelled image, whatever the task, so a patient is in the same
        # fold for stage 1 (Cardiomegaly) and stage 2 (14 labels): no stage-1 run has seen the
        # patients of its stage 2's test fold
        pool, pool_labels = select_task(frame, "all14")
        split = patient_folds(pool, pool_labels, folds, fold, seed=seed, fractions=fractions)
        rows["split"] = rows["image_id"].map(dict(zip(pool["image_id"], split))).to_numpy()
    else:
        rows["split"] = patient_split(rows, seed=seed, fractions=fractions).to_numpy()
    return rows, labels


def patient_folds(frame: pd.DataFrame, labels: Sequence[str], folds: int, fold: int, seed: int = 0,
                  fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> pd.Series:
    """'train' / 'dev' / 'test' per row for fold `fold` of a patient-wise `folds`-fold cross-validation.

    Every patient is in exactly one fold's test split, so over the K folds every image is a test
    image once. Official test lists are ignored (cross-validation rotates the test split). Folds
    are stratified: patients are ordered by the rarest finding they have (then at random with
    `seed`) and dealt round-robin, so a finding with a dozen positives has some in every fold.
    Dev is `fractions`' dev share of the other patients, dealt evenly along the same order.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"patient_folds: expected folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
    if "patient_id" not in frame:
        raise ValueError("patient_folds needs a 'patient_id' column (from common.data.load_dataset)")
    y = frame[list(labels)].to_numpy(dtype=np.float64)
    positives = np.nansum(y == 1, axis=0)
    # each image's rarest positive label (by count), or len(labels) for an image with none
    rank = np.argsort(np.argsort(positives, kind="stable"), kind="stable")
    rarest = np.where(y == 1, rank[None, :], len(labels)).min(axis=1) if len(labels) else np.zeros(len(frame))
    pid = frame["patient_id"].astype(str).to_numpy()
    stats = pd.DataFrame({"pid": pid, "rarest": rarest}).groupby("pid", sort=True).agg(
        rarest=("rarest", "min"), n=("rarest", "size"))
    rng = np.random.default_rng(seed)
    stats["draw"] = rng.permutation(len(stats))
    stats = stats.sort_values(["rarest", "draw"], kind="stable")
    # deal each patient to the fold with the fewest images so far (ties: the next fold in turn), so
    # folds hold about as many images even when some patients have many
    images, turn = np.zeros(folds, dtype=np.int64), 0
    fold_of = np.empty(len(stats), dtype=np.int64)
    for i, n in enumerate(stats["n"].to_numpy()):
        rotated = (np.arange(folds) + turn) % folds
        k = int(rotated[np.argmin(images[rotated])])
        fold_of[i], turn = k, k + 1
        images[k] += n
    assign = pd.Series("train", index=stats.index, dtype=object)
    test = fold_of == fold
    assign[test] = "test"
    f = np.asarray(fractions, dtype=np.float64)
    dev_share = f[1] / max(f[0] + f[1], 1e-12)
    seen = dev_images = 0.0
    for i, n in zip(np.flatnonzero(~test), stats["n"].to_numpy()[~test]):
        seen += n
        if dev_images + n / 2 < dev_share * seen:  # dev keeps its share of the images dealt so far
            assign.iloc[i] = "dev"
            dev_images += n
    return pd.Series(assign.reindex(pid).to_numpy(), index=frame.index, name="split")


def patient_split(
    frame: pd.DataFrame, seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2)
) -> pd.Series:
    """'train' / 'dev' / 'test' per row (aligned with frame.index), by patient, deterministic.

    Rows in an official test list go to 'test' and rows in an official train/val list never do;
    a patient with any official test image has all images in 'test', so no patient crosses a split.
    Other patients are shuffled with `seed` and cut at the cumulative image `fractions`.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, dev, test), got {fractions}")
    f = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    if "patient_id" not in frame:
        raise ValueError("patient_split needs a 'patient_id' column (from common.data.load_dataset)")
    pid = frame["patient_id"].astype(str).to_numpy()
    official = (frame["official_split"] if "official_split" in frame
                else pd.Series(np.nan, index=frame.index, dtype=object)).to_numpy(dtype=object)
    stats = pd.DataFrame({
        "pid": pid,
        "test": official == "test",
        "trainval": official == "trainval",
    }).groupby("pid", sort=True).agg(n=("test", "size"), test=("test", "any"), trainval=("trainval", "any"))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(stats))
    stats = stats.iloc[order]
    assign = pd.Series("", index=stats.index, dtype=object)
    assign[stats["test"]] = "test"

    def cut(group: pd.DataFrame, fr: np.ndarray) -> None:
        if not len(group) or fr.sum() <= 0:
            return
        fr = fr / fr.sum()
        # a patient goes to the split its cumulative image midpoint falls in: image fractions ~ fr
        mid = (group["n"].cumsum().to_numpy() - group["n"].to_numpy() / 2.0) / group["n"].sum()
        edges = np.cumsum(fr)[:-1]
        names = np.array(["train", "dev", "test"])[: len(fr)]
        assign[group.index] = names[np.searchsorted(edges, mid, side="right")]

    cut(stats[~stats["test"] & stats["trainval"]], f[:2].copy())
    cut(stats[~stats["test"] & ~stats["trainval"]], f.copy())
    return pd.Series(assign.reindex(pid).to_numpy(), index=frame.index, name="split")


def default_data_dirs(full_dir: str | Path = DATASET_FULL,
                      cardio_dir: str | Path = DATASET_CARDIOMEGALY) -> tuple[list[Path], bool]:
    """The dataset folders to use: the non-empty ones of (full_dir, cardio_dir), each found by
    `common.paths.find_data_dir`, `is_synthetic`=False; when both are empty or missing, the
    synthetic default ([nih, cardiomegaly] under cache_root()/synthetic-v1, generated once and
    reused), `is_synthetic`=True.
    """
    found = [p for p in (find_data_dir(full_dir), find_data_dir(cardio_dir)) if has_data(p)]
    if found:
        return found, False
    print(f"{DATASET_FULL}/ and {DATASET_CARDIOMEGALY}/ are empty: using the SYNTHETIC default dataset "
          f"(see {DATASET_FULL}/README.md to use real NIH data)", file=sys.stderr)
    return ensure_default(), True
