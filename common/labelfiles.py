"""Label files: the three layouts' CSVs read into one table each, row by row, and the rows that
could not be used as written.

    Data_Entry_2017_v2020.csv / Data_Entry_2017.csv   NIH's (NIH_CSVS): Image Index, Finding Labels, Patient ID, ...
    14_train.csv                                      the original project's dataset_full (FULL_CSV)
    train.csv / test.csv                              the original project's dataset_cardiomegaly (CARDIO_CSVS)

Rows, not files, fail. A row naming a finding outside the 14 (`Covid`) keeps its known findings;
a malformed row (a missing value, empty labels, more fields than the header, a Patient ID that is
not a number, a label that is not 0/1, an image listed twice; `common.data` adds a name that is a
folder) is skipped. Each is a `RowProblem` (file, line, image, kind, reason, action). Strict mode
(`strict=True`, `--strict`, or $MEDIMAGING_STRICT_LABELS=1 for trainer files and notebooks)
refuses a file with any problem row instead, as the suite once did. A file that matches no
layout, or cannot be read as CSV at all, is a `DatasetError`.

`common.data` builds datasets on these tables (and re-exports the names here); `load_labels` is
the labels-only reader `medimaging evaluate` uses.
"""
from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.labels import LABELS, split_findings

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


# ---------------------------------------------------------------------------------- row problems
# What reading a label file does with a row it cannot use as written (`RowProblem.kind`). One bad
# row never stops a dataset: it is kept with what is usable, or skipped, and reported.
UNKNOWN_FINDING = "unknown finding"
EMPTY_LABELS = "empty labels"
MISSING_VALUE = "missing value"
BAD_FIELDS = "wrong number of fields"
BAD_PATIENT_ID = "patient id not a number"
BAD_LABEL_VALUE = "label not 0, 1 or empty"
DUPLICATE_IMAGE = "duplicate image"
FOLDER_NOT_IMAGE = "folder named like an image"
KEPT = "kept with its known findings"
SKIPPED = "skipped"
PROBLEM_ACTIONS = {UNKNOWN_FINDING: KEPT, EMPTY_LABELS: SKIPPED, MISSING_VALUE: SKIPPED, BAD_FIELDS: SKIPPED,
                   BAD_PATIENT_ID: SKIPPED, BAD_LABEL_VALUE: SKIPPED, DUPLICATE_IMAGE: SKIPPED,
                   FOLDER_NOT_IMAGE: SKIPPED}
STRICT_ENV = "MEDIMAGING_STRICT_LABELS"  # "1": refuse a label file with any problem row (`--strict`)


@dataclass(frozen=True)
class RowProblem:
    """A label-file row that could not be used as written: where, what, and what was done with it."""

    file: str
    line: int | None  # 1-based line of the file (the header is line 1)
    image: str
    kind: str  # one of PROBLEM_ACTIONS
    reason: str

    @property
    def action(self) -> str:
        return PROBLEM_ACTIONS[self.kind]

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "image": self.image, "kind": self.kind,
                "reason": self.reason, "action": self.action}

    def __str__(self) -> str:
        where = f"{self.file}, line {self.line}" if self.line else self.file
        return f"{where}: {self.image or '(no image name)'}: {self.reason} ({self.action})"


def strict_default(strict: bool | None) -> bool:
    """`strict` as given, else from $MEDIMAGING_STRICT_LABELS (so notebooks and trainer files follow it):
    on for 1, true or yes."""
    if strict is not None:
        return bool(strict)
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


@contextmanager
def strict_labels(strict: bool) -> Iterator[None]:
    """$MEDIMAGING_STRICT_LABELS=1 while the block runs when `strict` (processes started inside, such
    as notebook kernels and DDP workers, inherit it); restored afterwards. Not strict: unchanged."""
    saved = os.environ.get(STRICT_ENV)
    if strict:
        os.environ[STRICT_ENV] = "1"
    try:
        yield
    finally:
        if strict and saved is None:
            os.environ.pop(STRICT_ENV, None)
        elif strict:
            os.environ[STRICT_ENV] = saved


def _record_lines(path: Path, skip: set[int]) -> list[int]:
    """The first line of each data record of a CSV, as pandas numbers its rows (blank lines and the
    records starting on a `skip` line left out)."""
    lines, end = [], 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        for k, record in enumerate(reader):
            start, end = end + 1, reader.line_num
            if k and record and start not in skip:
                lines.append(start)
    return lines


class RowIssues:
    """The problems found in one label file, by row position; `finish` drops the skipped rows and
    turns positions into line numbers (scanning the file only when something is to be reported)."""

    def __init__(self, path: Path, ids: pd.Series, bad_lines: dict[int, tuple[str, str]] | None = None):
        self.path = path
        self.ids = ids.fillna("").astype(str).str.strip().to_numpy(dtype=object)
        self.bad_lines = bad_lines or {}  # line -> (image, reason), for records pandas could not read
        self.skip = np.zeros(len(ids), dtype=bool)
        self.found: list[tuple[int, str, str | int]] = []  # (row, kind, reason or the row it duplicates)

    def add(self, rows, kind: str, reason) -> None:
        """Report `rows` (a boolean mask or positions); reason: text, or a function of the row position."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        for i in rows:
            if self.skip[i]:
                continue  # one problem per row is enough: the first that skips it
            self.found.append((int(i), kind, reason(int(i)) if callable(reason) else reason))
            if PROBLEM_ACTIONS[kind] == SKIPPED:
                self.skip[i] = True

    def missing(self, raw: pd.DataFrame, columns: Sequence[str]) -> None:
        for col in columns:
            empty = raw[col].isna().to_numpy() | (raw[col].astype(str).str.strip() == "").to_numpy()
            self.add(empty, MISSING_VALUE, f"no {col} (a short or incomplete row)")

    def finish(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, RowIssues]:
        """The usable rows of `frame` (aligned with the file's rows; `_row` = position), first
        occurrence of each image only."""
        kept = np.flatnonzero(~self.skip)
        dup = pd.Series(self.ids[kept]).duplicated(keep="first").to_numpy()
        if dup.any():
            first: dict[str, int] = {}
            for i in kept:
                first.setdefault(self.ids[i], int(i))
            for i in kept[dup]:
                self.found.append((int(i), DUPLICATE_IMAGE, first[self.ids[i]]))
                self.skip[i] = True
        out = frame.loc[~self.skip].copy()
        out["_row"] = np.flatnonzero(~self.skip)
        return out, self

    def problems(self) -> list[RowProblem]:
        """Every problem, in file order, with its line."""
        if not self.found and not self.bad_lines:
            return []
        lines = _record_lines(self.path, set(self.bad_lines)) if self.found else []
        if len(lines) != len(self.ids):  # a file pandas reads differently from the csv module
            lines = [i + 2 for i in range(len(self.ids))]
        out = [RowProblem(str(self.path), line, image, BAD_FIELDS, reason)
               for line, (image, reason) in self.bad_lines.items()]
        for i, kind, reason in self.found:
            if kind == DUPLICATE_IMAGE:
                reason = f"the same image as line {lines[reason]} (the first row of an image is used)"
            out.append(RowProblem(str(self.path), lines[i], self.ids[i], kind, reason))
        return sorted(out, key=lambda p: p.line or 0)


def raise_if_strict(problems: list[RowProblem], strict: bool) -> None:
    if strict and problems:
        more = f"\n(and {len(problems) - 1} more problem row(s))" if len(problems) > 1 else ""
        raise DatasetError(f"{problems[0]}{more}\nstrict mode refuses a label file with any problem row; "
                           f"without --strict ({STRICT_ENV}) such rows are reported and kept or skipped.")


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


def _read_rows(path: Path, **kw) -> tuple[pd.DataFrame, dict[int, tuple[str, str]]]:
    """A label file's rows, and {line: (first field, reason)} for the records with more fields than the header,
    which are left out (pandas refuses the whole file for one such line)."""
    try:
        return _read_csv(path, **kw), {}
    except DatasetError:
        width = len(_read_csv(path, nrows=0).columns)
        bad, end = {}, 0
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                for k, record in enumerate(reader):
                    start, end = end + 1, reader.line_num
                    if k and len(record) > width:
                        bad[start] = (record[0].strip(), f"{len(record)} fields where the header has {width}")
        except (UnicodeDecodeError, csv.Error):
            bad = {}
        if not bad:
            raise
        return _read_csv(path, on_bad_lines="skip", **kw), bad


def _findings_matrix(findings: pd.Series) -> tuple[np.ndarray, dict[int, list[str]], np.ndarray]:
    """'A|B' / 'No Finding' texts → ((N, 14) float32 of 0/1, {row: unknown names}, empty-text mask).

    Parsed once per distinct text; a row with unknown names keeps its known findings (1) and the
    others absent (0), as NIH's texts list every finding of an image. Empty texts give NaN rows.
    """
    text = findings.fillna("").astype(str)
    codes, uniques = pd.factorize(text, sort=False)
    table = np.zeros((len(uniques) + 1, len(LABELS)), dtype=np.float32)
    col = {name: i for i, name in enumerate(LABELS)}
    unknown_by_code: dict[int, list[str]] = {}
    for k, value in enumerate(uniques):
        known, unknown = split_findings(value)
        for n in known:
            table[k, col[n]] = 1.0
        if unknown:
            unknown_by_code[k] = unknown
    empty = (text.str.strip() == "").to_numpy()
    out = table[codes]
    out[empty] = np.nan  # no findings text at all: unlabelled, not "No Finding"
    unknown = {int(i): unknown_by_code[c] for c in unknown_by_code for i in np.flatnonzero(codes == c)}
    return out, unknown, empty


def _report_unknown(issues: RowIssues, unknown: dict[int, list[str]]) -> None:
    for i, names in sorted(unknown.items()):
        issues.add([i], UNKNOWN_FINDING, f"unknown finding(s) {names}")


def _label_frame(ids: pd.Series, labels: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"image_id": ids.fillna("").astype(str).str.strip().to_numpy()})
    for i, name in enumerate(LABELS):
        frame[name] = labels[:, i].astype(np.float32)
    return frame


def _numeric_patient_ids(raw: pd.DataFrame, col: str, issues: RowIssues) -> None:
    """NIH's `Patient ID` is a number: report (and skip) rows where it is something else."""
    values = raw[col]
    bad = pd.to_numeric(values, errors="coerce").isna().to_numpy() & values.notna().to_numpy()
    bad &= (values.astype(str).str.strip() != "").to_numpy()
    issues.add(bad, BAD_PATIENT_ID, lambda i: f"{col} {values.iloc[i]!r} is not a number")


# ---------------------------------------------------------------------------- per-layout tables
def read_nih_table(csv_path: Path) -> tuple[pd.DataFrame, RowIssues]:
    """Data_Entry csv → (usable rows: image_id, patient_id, LABELS, age, sex, view; their problems)."""
    header = _read_csv(csv_path, nrows=0).columns
    missing = [c for c in _NIH_REQUIRED if c not in header]
    if missing:
        raise DatasetError(
            f"{csv_path}: missing column(s) {missing}; an NIH Data_Entry file has "
            f"{list(_NIH_REQUIRED)} among its columns.\n{LAYOUT_HELP}"
        )
    # every column, not usecols: pandas then notices a row with more fields than the header
    raw, bad_lines = _read_rows(csv_path, dtype={c: str for c in _NIH_REQUIRED})
    issues = RowIssues(csv_path, raw["Image Index"], bad_lines)
    labels, unknown, empty = _findings_matrix(raw["Finding Labels"])
    issues.missing(raw, ["Image Index", "Patient ID"])
    issues.add(empty, EMPTY_LABELS, "empty Finding Labels (NIH writes 'No Finding' for an image without findings)")
    _numeric_patient_ids(raw, "Patient ID", issues)
    _report_unknown(issues, unknown)
    frame = _label_frame(raw["Image Index"], labels)
    frame["patient_id"] = _patient_ids(raw["Patient ID"])
    if "Patient Age" in raw:
        # the 2017 file writes ages as "058Y"; the v2020 file as plain numbers
        age = raw["Patient Age"].astype(str).str.extract(r"(\d+)", expand=False)
        frame["age"] = pd.to_numeric(age, errors="coerce").astype(np.float32)
    if "Patient Gender" in raw:
        frame["sex"] = raw["Patient Gender"].astype("string").str.strip().to_numpy(dtype=object)
    if "View Position" in raw:
        frame["view"] = raw["View Position"].astype("string").str.strip().to_numpy(dtype=object)
    return issues.finish(frame)


def read_full_table(csv_path: Path) -> tuple[pd.DataFrame, RowIssues]:
    """14_train.csv: an image id column and either a findings text column or 14 label columns."""
    raw, bad_lines = _read_rows(csv_path, dtype=str)
    id_col = _pick(raw.columns, _ID_COLUMNS)
    text_col = _pick(raw.columns, _FINDINGS_COLUMNS)
    label_cols = [c for c in LABELS if c in raw.columns]
    if id_col is None or (text_col is None and len(label_cols) != len(LABELS)):
        raise DatasetError(
            f"{csv_path}: needs an image id column (one of {list(_ID_COLUMNS[:3])}) and a findings column "
            f"('Finding Labels': '|'-separated findings or 'No Finding') or one column per label; "
            f"found columns {list(raw.columns)}.\n{LAYOUT_HELP}"
        )
    issues = RowIssues(csv_path, raw[id_col], bad_lines)
    issues.missing(raw, [id_col])
    if text_col is not None:
        labels, unknown, empty = _findings_matrix(raw[text_col])
        issues.add(empty, EMPTY_LABELS, f"empty {text_col} (write 'No Finding' for an image without findings)")
        _report_unknown(issues, unknown)
    else:
        labels = raw[list(LABELS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        bad = ~np.isin(labels, (0.0, 1.0)) & ~np.isnan(labels)
        written = raw[list(LABELS)].notna().to_numpy() & np.isnan(labels)  # text where a number belongs
        bad |= written & (raw[list(LABELS)].astype(str).apply(lambda c: c.str.strip()) != "").to_numpy()

        def reason(i: int) -> str:
            c = int(np.flatnonzero(bad[i])[0])
            return f"label {LABELS[c]} is {raw[LABELS[c]].iloc[i]!r}, not 0, 1 or empty"

        issues.add(bad.any(axis=1), BAD_LABEL_VALUE, reason)
    frame = _label_frame(raw[id_col], labels)
    pid_col = _pick(raw.columns, ("Patient ID", "patient_id", "PatientID"))
    if pid_col is not None:
        issues.missing(raw, [pid_col])
        if pid_col == "Patient ID":  # NIH's column: a number by its contract
            _numeric_patient_ids(raw, pid_col, issues)
        frame["patient_id"] = _patient_ids(raw[pid_col])
    else:
        frame["patient_id"] = _patients_from_ids(frame["image_id"])
    return issues.finish(frame)


def _cardio_labels(text: pd.Series) -> tuple[np.ndarray, dict[int, list[str]]]:
    """`disease` texts → (N, 14): Cardiomegaly 1 / 0, a finding other than Cardiomegaly written
    there 1, the other labels NaN; an empty text an unlabelled image (all NaN)."""
    codes, uniques = pd.factorize(text.fillna("").astype(str).str.strip(), sort=False)
    table = np.full((len(uniques) + 1, len(LABELS)), np.nan, dtype=np.float32)
    unknown_by_code: dict[int, list[str]] = {}
    for k, value in enumerate(uniques):
        if value.lower() in ("", "nan"):
            continue
        known, unknown = split_findings(value)
        table[k, LABELS.index("Cardiomegaly")] = 0.0
        for n in known:
            table[k, LABELS.index(n)] = 1.0
        if unknown:
            unknown_by_code[k] = unknown
    unknown = {int(i): unknown_by_code[c] for c in unknown_by_code for i in np.flatnonzero(codes == c)}
    return table[codes], unknown


def read_cardio_table(csv_path: Path) -> tuple[pd.DataFrame, RowIssues]:
    """train.csv / test.csv (imageID,disease): Cardiomegaly 1/0, the other 13 labels NaN.

    A missing or empty `disease` column (the original leaderboard test set) gives NaN labels.
    """
    raw, bad_lines = _read_rows(csv_path, dtype=str, keep_default_na=False)
    id_col = _pick(raw.columns, _ID_COLUMNS)
    if id_col is None:
        raise DatasetError(
            f"{csv_path}: needs an 'imageID' column (and optionally 'disease' = Cardiomegaly or No Finding); "
            f"found columns {list(raw.columns)}.\n{LAYOUT_HELP}"
        )
    issues = RowIssues(csv_path, raw[id_col], bad_lines)
    issues.missing(raw, [id_col])
    labels = np.full((len(raw), len(LABELS)), np.nan, dtype=np.float32)
    dis_col = _pick(raw.columns, ("disease", "Finding Labels", "label", "labels"))
    if dis_col is not None:
        labels, unknown = _cardio_labels(raw[dis_col])
        _report_unknown(issues, unknown)
    frame = _label_frame(raw[id_col], labels)
    frame["patient_id"] = _patients_from_ids(frame["image_id"])
    return issues.finish(frame)


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


def problem_counts(problems: Sequence[RowProblem]) -> dict[str, int]:
    """kind -> number of rows, in PROBLEM_ACTIONS order."""
    counts = {kind: 0 for kind in PROBLEM_ACTIONS}
    for p in problems:
        counts[p.kind] += 1
    return {k: n for k, n in counts.items() if n}


def problems_line(problems: Sequence[RowProblem], where: str) -> str:
    """One line for stderr: how many rows of `where` had which problem and what was done."""
    parts = [f"{n} {kind} ({PROBLEM_ACTIONS[kind]})" for kind, n in problem_counts(problems).items()]
    return f"{where}: {len(problems)} label row(s) with problems: {', '.join(parts)}"


def load_labels(path: str | Path, strict: bool | None = None, quiet: bool = False) -> pd.DataFrame:
    """Labels only (no images needed): DataFrame indexed by image id, LABELS columns, 1 / 0 / NaN.

    `path` is a Data_Entry csv, a 14_train.csv, a cardiomegaly train/test csv or a dataset folder.
    Problem rows are handled as `load_dataset` handles them (reported on stderr unless `quiet`).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        layout, csv_path = detect_layout(path)
        if layout == "cardiomegaly":
            read = [read_cardio_table(path / n) for n in CARDIO_CSVS if (path / n).is_file()]
        else:
            read = [read_nih_table(csv_path) if layout == "nih" else read_full_table(csv_path)]
    elif path.is_file():
        header = _read_csv(path, nrows=0).columns
        if all(c in header for c in _NIH_REQUIRED):
            read = [read_nih_table(path)]
        elif "disease" in header or (_pick(header, _ID_COLUMNS) and not _pick(header, _FINDINGS_COLUMNS)
                                     and not any(c in header for c in LABELS)):
            read = [read_cardio_table(path)]
        else:
            read = [read_full_table(path)]
    else:
        raise DatasetError(f"{path}: no such label file or dataset folder.\n{LAYOUT_HELP}")
    problems = [p for _, issues in read for p in issues.problems()]
    raise_if_strict(problems, strict_default(strict))
    table = pd.concat([t for t, _ in read], ignore_index=True)
    if problems and not quiet:
        print(problems_line(problems, str(path)), file=sys.stderr)
    out = table.set_index("image_id")[list(LABELS)]
    out.index.name = "image_id"
    return out
