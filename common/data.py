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
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.cache import ImageCache
from common.images import IMAGE_EXTENSIONS
from common.labels import LABELS, NO_FINDING, TASKS, parse_findings
from common.paths import DATASET_CARDIOMEGALY, DATASET_FULL, find_data_dir, has_data
from common.synthetic import SYNTHETIC_MARKER, ensure_default

NIH_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
FULL_CSV = "14_train.csv"
CARDIO_CSVS = ("train.csv", "test.csv")

LAYOUT_HELP = (
    "Expected one of these layouts:\n"
    "  NIH official:          DIR/Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv) and the images\n"
    "                         anywhere below DIR (images_001/images/*.png or images/*.png);\n"
    "                         optional DIR/train_val_list.txt and DIR/test_list.txt\n"
    "  dataset_full:          DIR/14_train.csv (image id + '|'-separated findings or 'No Finding'),\n"
    "                         images anywhere below DIR (e.g. sample/images/*.png)\n"
    "  dataset_cardiomegaly:  DIR/train.csv, DIR/test.csv (imageID,disease) with DIR/train/ and DIR/test/\n"
    "See dataset_full/README.md and dataset_cardiomegaly/README.md."
)

# Column names accepted for the image id and the findings text, most specific first.
_ID_COLUMNS = ("Image Index", "imageID", "image_id", "ImageID", "Image", "image", "filename", "file", "id")
_FINDINGS_COLUMNS = ("Finding Labels", "disease", "Finding_Labels", "findings", "labels", "label")
_NIH_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")


class DatasetError(ValueError):
    """A dataset folder or label file that does not match any supported layout."""


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

    @property
    def labels(self) -> np.ndarray:
        """(N, 14) float32 label matrix in LABELS order (NaN = not labelled)."""
        return self.frame[list(LABELS)].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.frame)


# --------------------------------------------------------------------------------------- helpers
def _patient_ids(column: pd.Series) -> np.ndarray:
    """A Patient ID column as NIH writes it in image names: numbers zero-padded to 8 digits, other
    values as given."""
    pid = pd.to_numeric(column, errors="coerce")
    return np.where(pid.notna(), pid.fillna(0).astype(np.int64).map("{:08d}".format), column.astype(str))


def _patients_from_ids(ids: pd.Series) -> pd.Series:
    stems = ids.str.replace(r"\.[^.]*$", "", regex=True)
    nih = stems.str.extract(r"^(\d{8})_\d+$", expand=False)
    return nih.fillna(stems).astype(str)


def index_images(root: str | Path) -> dict[str, str]:
    """Map file name → absolute path for every image file below `root` (one os.scandir walk).

    Hidden folders are skipped. When a name occurs twice the first in sorted folder order wins.
    """
    root = Path(root).resolve()
    found: dict[str, str] = {}
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
            if e.is_dir(follow_symlinks=True):
                subdirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.name not in found:
                found[e.name] = e.path
        stack.extend(reversed(subdirs))  # depth-first in sorted order
    return found


def _pick(columns: Iterable[str], candidates: Sequence[str]) -> str | None:
    cols = list(columns)
    for c in candidates:
        if c in cols:
            return c
    lower = {c.lower().strip(): c for c in cols}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def _read_csv(path: Path, **kw) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kw)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found.\n{LAYOUT_HELP}") from None
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: the CSV file is empty.\n{LAYOUT_HELP}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable CSV file ({str(err).splitlines()[0]}).") from None


def _findings_matrix(findings: pd.Series, csv_path: Path) -> np.ndarray:
    """'A|B' / 'No Finding' texts → (N, 14) float32 of 0/1 (parsed once per distinct text)."""
    codes, uniques = pd.factorize(findings.fillna("").astype(str), sort=False)
    table = np.zeros((len(uniques) + 1, len(LABELS)), dtype=np.float32)
    col = {name: i for i, name in enumerate(LABELS)}
    for k, text in enumerate(uniques):
        try:
            names = parse_findings(text)
        except ValueError as err:
            row = int(np.flatnonzero(codes == k)[0]) + 2  # +1 header, +1 one-based
            raise DatasetError(f"{csv_path}, line {row}: {err}") from None
        for n in names:
            table[k, col[n]] = 1.0
    empty = np.flatnonzero(findings.isna().to_numpy() | (findings.astype(str).str.strip() == "").to_numpy())
    out = table[codes]
    if len(empty):
        out[empty] = np.nan  # no findings text at all: unlabelled, not "No Finding"
    return out


def _label_frame(ids: pd.Series, labels: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"image_id": ids.astype(str).str.strip().to_numpy()})
    for i, name in enumerate(LABELS):
        frame[name] = labels[:, i].astype(np.float32)
    return frame


# ---------------------------------------------------------------------------- per-layout tables
def _nih_table(csv_path: Path) -> pd.DataFrame:
    """Data_Entry csv → image_id, patient_id, LABELS, age, sex, view (all rows, no image check)."""
    header = _read_csv(csv_path, nrows=0).columns
    missing = [c for c in _NIH_REQUIRED if c not in header]
    if missing:
        raise DatasetError(
            f"{csv_path}: missing column(s) {missing}; an NIH Data_Entry file has "
            f"{list(_NIH_REQUIRED)} among its columns.\n{LAYOUT_HELP}"
        )
    optional = [c for c in ("Patient Age", "Patient Gender", "View Position") if c in header]
    raw = _read_csv(csv_path, usecols=list(_NIH_REQUIRED) + optional,
                    dtype={"Image Index": str, "Finding Labels": str})
    frame = _label_frame(raw["Image Index"], _findings_matrix(raw["Finding Labels"], csv_path))
    frame["patient_id"] = _patient_ids(raw["Patient ID"])
    if "Patient Age" in raw:
        # the 2017 file writes ages as "058Y"; the v2020 file as plain numbers
        age = raw["Patient Age"].astype(str).str.extract(r"(\d+)", expand=False)
        frame["age"] = pd.to_numeric(age, errors="coerce").astype(np.float32)
    if "Patient Gender" in raw:
        frame["sex"] = raw["Patient Gender"].astype("string").str.strip().to_numpy(dtype=object)
    if "View Position" in raw:
        frame["view"] = raw["View Position"].astype("string").str.strip().to_numpy(dtype=object)
    return frame


def _full_table(csv_path: Path) -> pd.DataFrame:
    """14_train.csv: an image id column and either a findings text column or 14 label columns."""
    raw = _read_csv(csv_path, dtype=str)
    id_col = _pick(raw.columns, _ID_COLUMNS)
    text_col = _pick(raw.columns, _FINDINGS_COLUMNS)
    label_cols = [c for c in LABELS if c in raw.columns]
    if id_col is None or (text_col is None and len(label_cols) != len(LABELS)):
        raise DatasetError(
            f"{csv_path}: needs an image id column (one of {list(_ID_COLUMNS[:3])}) and a findings column "
            f"('Finding Labels': '|'-separated findings or 'No Finding') or one column per label; "
            f"found columns {list(raw.columns)}.\n{LAYOUT_HELP}"
        )
    if text_col is not None:
        labels = _findings_matrix(raw[text_col], csv_path)
    else:
        labels = raw[list(LABELS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        bad = ~np.isin(labels, (0.0, 1.0)) & ~np.isnan(labels)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DatasetError(f"{csv_path}, line {r + 2}: label {LABELS[c]} must be 0, 1 or empty")
    frame = _label_frame(raw[id_col], labels)
    pid_col = _pick(raw.columns, ("Patient ID", "patient_id", "PatientID"))
    if pid_col is not None:
        frame["patient_id"] = _patient_ids(raw[pid_col])
    else:
        frame["patient_id"] = _patients_from_ids(frame["image_id"])
    return frame


def _cardio_table(csv_path: Path) -> pd.DataFrame:
    """train.csv / test.csv (imageID,disease): Cardiomegaly 1/0, the other 13 labels NaN.

    A missing or empty `disease` column (the original leaderboard test set) gives NaN labels.
    """
    raw = _read_csv(csv_path, dtype=str, keep_default_na=False)
    id_col = _pick(raw.columns, _ID_COLUMNS)
    if id_col is None:
        raise DatasetError(
            f"{csv_path}: needs an 'imageID' column (and optionally 'disease' = Cardiomegaly or No Finding); "
            f"found columns {list(raw.columns)}.\n{LAYOUT_HELP}"
        )
    labels = np.full((len(raw), len(LABELS)), np.nan, dtype=np.float32)
    dis_col = _pick(raw.columns, ("disease", "Finding Labels", "label", "labels"))
    if dis_col is not None:
        text = raw[dis_col].astype(str).str.strip()
        known = {"cardiomegaly": 1.0, NO_FINDING.lower(): 0.0, "": np.nan, "nan": np.nan}
        values = text.str.lower().map(known)
        bad = values.isna() & ~text.str.lower().isin(["", "nan"])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatasetError(
                f"{csv_path}, line {row + 2}: disease {text.iloc[row]!r} is neither 'Cardiomegaly' nor "
                f"'{NO_FINDING}' (nor empty, for an unlabelled image)"
            )
        labels[:, LABELS.index("Cardiomegaly")] = values.to_numpy(dtype=np.float32)
    frame = _label_frame(raw[id_col], labels)
    frame["patient_id"] = _patients_from_ids(frame["image_id"])
    return frame


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


# ------------------------------------------------------------------------------ layout detection
def detect_layout(root: str | Path) -> tuple[str, Path]:
    """(layout, label csv) of a dataset folder; a clear DatasetError when it matches none."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found.\n{LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (give the dataset folder, not a file).\n{LAYOUT_HELP}")
    for name in NIH_CSVS:
        if (root / name).is_file():
            return "nih", root / name
    if (root / FULL_CSV).is_file():
        return "full", root / FULL_CSV
    if (root / "train.csv").is_file() or (root / "test.csv").is_file():
        return "cardiomegaly", root / ("train.csv" if (root / "train.csv").is_file() else "test.csv")
    present = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))[:12]
    raise DatasetError(
        f"{root}: no label file found (looked for {', '.join(NIH_CSVS + (FULL_CSV,) + CARDIO_CSVS)}); "
        f"the folder holds {present or 'nothing'}.\n{LAYOUT_HELP}"
    )


def _attach_paths(table: pd.DataFrame, files: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    paths = table["image_id"].map(files)
    has = paths.notna().to_numpy()
    missing = table.loc[~has, "image_id"].tolist()
    out = table.loc[has].copy()
    out.insert(1, "path", paths[has].to_numpy(dtype=object))
    return out, missing


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


def load_dataset(root: str | Path, name: str | None = None, quiet: bool = False) -> XrayData:
    """Read a dataset folder in any of the three layouts (see the module docstring).

    Rows whose image file is absent are dropped and counted in `rows_without_image`, with one
    summary line on stderr (unless `quiet`).
    """
    root = Path(root).expanduser().resolve()
    layout, csv_path = detect_layout(root)
    name = name or root.name
    if layout == "nih":
        table = _nih_table(csv_path)
        files = index_images(root)
        frame, missing = _attach_paths(table, files)
        tv, te = root / "train_val_list.txt", root / "test_list.txt"
        if tv.is_file() or te.is_file():
            split = pd.Series(np.nan, index=frame.index, dtype=object)
            if tv.is_file():
                split[frame["image_id"].isin(_read_list(tv))] = "trainval"
            if te.is_file():
                split[frame["image_id"].isin(_read_list(te))] = "test"
            frame["official_split"] = split
        total = len(table)
    elif layout == "full":
        table = _full_table(csv_path)
        frame, missing = _attach_paths(table, index_images(root))
        total = len(table)
    else:
        parts, missing, total = [], [], 0
        for split_name, official in (("train", "trainval"), ("test", "test")):
            csv = root / f"{split_name}.csv"
            if not csv.is_file():
                continue
            table = _cardio_table(csv)
            total += len(table)
            folder = root / split_name
            files = index_images(folder) if folder.is_dir() else {}
            if not files and len(table):
                raise DatasetError(
                    f"{folder}: no images found for the {len(table)} rows of {csv.name}.\n{LAYOUT_HELP}"
                )
            part, miss = _attach_paths(table, files)
            part["official_split"] = official
            parts.append(part)
            missing += miss
        frame = pd.concat(parts, ignore_index=True)
    if total and len(frame) == 0:
        raise DatasetError(
            f"{root}: none of the {total} images listed in {csv_path.name} were found below the folder "
            f"(e.g. {missing[0]!r}).\n{LAYOUT_HELP}"
        )
    if missing and not quiet:
        print(f"{name}: {len(frame)} images found, {len(missing)} of the {total} rows of "
              f"{csv_path.name} have no image file (skipped)", file=sys.stderr)
    return XrayData(
        frame=_finish(frame, name), root=root, layout=layout, rows_without_image=len(missing),
        name=name, is_synthetic=(root / SYNTHETIC_MARKER).is_file(), missing_ids=missing,
    )


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
    )


def summarize(dirs: Sequence[str | Path], size: int = 224, workers: int | None = None, progress: bool = True) -> dict:
    """What one or more dataset folders (combined) hold, as a JSON-able dict: dataset, layout,
    is_synthetic, images_found, rows_without_image, unreadable ([{path, reason}]), patients,
    positives (label -> count), labelled (label -> images with a known label).

    Every image is decoded through the image cache at `size`, which finds the unreadable ones and
    leaves the work for training to reuse.
    """
    data = combine([load_dataset(d, quiet=True) for d in dirs])
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


def task_split(frame: pd.DataFrame, task: str, seed: int = 0,
               fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> tuple[pd.DataFrame, list[str]]:
    """A task's rows (`select_task`) with a 'split' column from `patient_split`: the split `fit`
    makes, and what every later step (evaluation, calibration, compression) recomputes from a run's
    config. Returns (rows, output labels); no rows gives an empty frame, not an error."""
    rows, labels = select_task(frame, task)
    rows["split"] = patient_split(rows, seed=seed, fractions=fractions).to_numpy() if len(rows) else []
    return rows, labels


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


def load_labels(path: str | Path) -> pd.DataFrame:
    """Labels only (no images needed): DataFrame indexed by image id, LABELS columns, 1 / 0 / NaN.

    `path` is a Data_Entry csv, a 14_train.csv, a cardiomegaly train/test csv or a dataset folder.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        layout, csv_path = detect_layout(path)
        if layout == "cardiomegaly":
            tables = [_cardio_table(path / n) for n in CARDIO_CSVS if (path / n).is_file()]
            table = pd.concat(tables, ignore_index=True)
        else:
            table = _nih_table(csv_path) if layout == "nih" else _full_table(csv_path)
    elif path.is_file():
        header = _read_csv(path, nrows=0).columns
        if all(c in header for c in _NIH_REQUIRED):
            table = _nih_table(path)
        elif "disease" in header or (_pick(header, _ID_COLUMNS) and not _pick(header, _FINDINGS_COLUMNS)
                                     and not any(c in header for c in LABELS)):
            table = _cardio_table(path)
        else:
            table = _full_table(path)
    else:
        raise DatasetError(f"{path}: no such label file or dataset folder.\n{LAYOUT_HELP}")
    out = table.set_index("image_id")[list(LABELS)]
    out.index.name = "image_id"
    return out


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
