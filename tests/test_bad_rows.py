"""Rows, not datasets, fail: a copy of real NIH rows with hostile rows among them is read, every bad
row is reported with its file, line and reason, and `--strict` gives the old refusal."""
from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from common import cli
from common.data import DatasetError, load_dataset, load_labels
from common.labelfiles import (
    BAD_FIELDS,
    BAD_LABEL_VALUE,
    BAD_PATIENT_ID,
    DUPLICATE_IMAGE,
    EMPTY_LABELS,
    FOLDER_NOT_IMAGE,
    MISSING_VALUE,
    STRICT_ENV,
    UNKNOWN_FINDING,
)
from common.labels import LABELS, split_findings

# line -> kind of the hostile rows `hostile_nih` writes after 20 good ones (lines 2-21)
EXPECTED = {22: UNKNOWN_FINDING, 23: UNKNOWN_FINDING, 24: MISSING_VALUE, 25: BAD_FIELDS, 26: EMPTY_LABELS,
            27: DUPLICATE_IMAGE, 28: BAD_PATIENT_ID, 29: FOLDER_NOT_IMAGE, 30: MISSING_VALUE}


@pytest.fixture
def hostile_nih(tmp_path, nih_sample) -> dict:
    """An NIH-layout folder: 26 real images (symlinked), NIH's own rows for 20 of them, then one
    hostile row per kind of problem, a row whose image is absent, and a folder named like an image."""
    with open(nih_sample / "Data_Entry_2017_v2020.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        present = {p.name for p in (nih_sample / "images").iterdir()}
        rows = [r for r in reader if r[0] in present][:26]
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    for r in rows:
        os.symlink(nih_sample / "images" / r[0], root / "images" / r[0])
    (root / "images" / "90000013_000.png").mkdir()  # a folder named like an image
    (root / "images" / "90000013_000.png" / "notes.txt").write_text("not an image\n")

    def row(name, findings, pid="77"):
        return [name, findings, "0", pid, "40", "M", "PA", "2500", "2048", "0.143", "0.143"]

    names = [r[0] for r in rows]
    hostile = [
        row(names[20], "Covid"),  # 22: unknown only: kept, every known finding absent
        row(names[21], "Effusion|Covid"),  # 23: kept with Effusion
        [names[22], "Effusion"],  # 24: a short row: no Patient ID
        row(names[23], "Mass") + ["extra", "fields"],  # 25: more fields than the header
        row(names[24], ""),  # 26: empty labels
        row(names[1], "Hernia"),  # 27: the image of line 3 again
        row(names[25], "Nodule", pid="abc"),  # 28: a patient id that is not a number
        row("90000013_000.png", "Mass"),  # 29: a folder, not an image file
        row("", "No Finding"),  # 30: no image name
        row("99999999_000.png", "No Finding"),  # 31: an image not downloaded: a row without an image
    ]
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows[:20])
        w.writerows(hostile)
    return {"root": root, "names": names, "csv": root / "Data_Entry_2017_v2020.csv", "good": rows[:20]}


def test_every_bad_row_is_reported_with_file_line_and_reason(hostile_nih, capsys):
    d = load_dataset(hostile_nih["root"])
    names = hostile_nih["names"]
    assert {p.line: p.kind for p in d.problems} == EXPECTED
    assert all(p.file == str(hostile_nih["csv"]) for p in d.problems)
    by_line = {p.line: p for p in d.problems}
    assert by_line[22].image == names[20] and "['Covid']" in by_line[22].reason
    assert by_line[27].image == names[1] and "line 3" in by_line[27].reason
    assert "'abc'" in by_line[28].reason and "folder" in by_line[29].reason
    assert "13 fields where the header has 11" in by_line[25].reason
    # the 20 good rows and the 2 with an unknown finding are read, nothing else
    f = d.frame.set_index("image_id")
    assert sorted(f.index) == sorted(names[:22]) and d.rows_without_image == 1
    assert (f.loc[names[20], list(LABELS)] == 0).all()  # only unknown findings: every known one absent
    assert f.loc[names[21], "Effusion"] == 1 and f.loc[names[21], list(LABELS)].sum() == 1
    first = hostile_nih["good"][1]  # the first row of a duplicated image is the one used
    assert {n for n in LABELS if f.loc[names[1], n] == 1} == set(split_findings(first[1])[0])
    err = capsys.readouterr().err
    assert "9 label row(s) with problems: 2 unknown finding (kept with its known findings)" in err
    assert f"{hostile_nih['csv']}, line 22: {names[20]}: unknown finding(s) ['Covid']" in err
    assert "1 of the 30 rows" in err  # the absent image is still counted, not a problem


def test_strict_mode_refuses_as_before(hostile_nih, monkeypatch):
    with pytest.raises(DatasetError, match=r"line 22: .*unknown finding\(s\) \['Covid'\](.|\n)*8 more"):
        load_dataset(hostile_nih["root"], strict=True)
    monkeypatch.setenv(STRICT_ENV, "1")  # what trainer files and notebooks follow
    with pytest.raises(DatasetError, match="strict mode"):
        load_dataset(hostile_nih["root"], quiet=True)
    assert len(load_dataset(hostile_nih["root"], quiet=True, strict=False)) == 22


def test_data_summary_lists_every_problem_and_groups_them(hostile_nih, capsys):
    root = str(hostile_nih["root"])
    assert cli.main(["data", "summary", root, "--json", "--size", "32"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["images_found"] == 22 and s["rows_without_image"] == 1 and s["unreadable"] == []
    assert s["rows_skipped"] == 7 and s["rows_kept_with_unknown_findings"] == 2
    assert {p["line"]: p["kind"] for p in s["problems"]} == EXPECTED
    assert all(set(p) == {"file", "line", "image", "kind", "reason", "action"} and p["reason"] for p in s["problems"])
    assert s["problem_counts"] == {UNKNOWN_FINDING: 2, EMPTY_LABELS: 1, MISSING_VALUE: 2, BAD_FIELDS: 1,
                                   BAD_PATIENT_ID: 1, DUPLICATE_IMAGE: 1, FOLDER_NOT_IMAGE: 1}
    assert cli.main(["data", "summary", root, "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"rows skipped \(problems\) +7\nrows with unknown findings +2\n", text)
    assert "unknown finding: 2 rows, kept with its known findings" in text
    assert "missing value: 2 rows, skipped" in text
    assert "line 29: 90000013_000.png: names a folder" in text
    assert cli.main(["data", "summary", root, "--size", "32", "--strict"]) == 2
    assert "line 22" in capsys.readouterr().err


def test_training_reads_the_usable_rows(hostile_nih, tmp_path, capsys):
    """`train` once refused the whole folder for one `Covid`; now it trains on the usable rows."""
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(hostile_nih["root"]), "--model", "test_efficientnet",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--n-boot", "10",
                     "--no-progress", "--out", str(out)]) == 0
    assert "9 label row(s) with problems" in capsys.readouterr().err
    split = pd.read_csv(out / "split.csv")
    assert len(split) == 22 and set(split.iloc[:, 0]) == set(hostile_nih["names"][:22])


def test_labels_only_reading_skips_the_same_rows(hostile_nih, capsys):
    labels = load_labels(hostile_nih["csv"])
    names = hostile_nih["names"]
    assert set(labels.index) == set(names[:22]) | {"90000013_000.png", "99999999_000.png"}
    assert "9 label row(s)" not in capsys.readouterr().err  # the folder is not a label-file problem here
    with pytest.raises(DatasetError, match="line 22"):
        load_labels(hostile_nih["csv"], strict=True)


def test_other_layouts_keep_known_findings_and_skip_bad_values(tmp_path, nih_sample):
    images = sorted((nih_sample / "images").glob("*.png"))[:6]
    cardio = tmp_path / "cardio"
    (cardio / "train").mkdir(parents=True)
    for p in images:
        os.symlink(p, cardio / "train" / p.name)
    pd.DataFrame({"imageID": [p.name for p in images],
                  "disease": ["Cardiomegaly", "No Finding", "Covid", "effusion", "Cardiomegaly|Covid", ""]}
                 ).to_csv(cardio / "train.csv", index=False)
    d = load_dataset(cardio, quiet=True)
    f = d.frame.set_index("image_id")
    assert [p.line for p in d.problems] == [4, 6] and {p.kind for p in d.problems} == {UNKNOWN_FINDING}
    assert f["Cardiomegaly"].tolist()[:5] == [1, 0, 0, 0, 1] and np.isnan(f["Cardiomegaly"].iloc[5])
    assert f.loc[images[3].name, "Effusion"] == 1  # any case: still a known finding

    full = tmp_path / "full"
    (full / "images").mkdir(parents=True)
    for p in images:
        os.symlink(p, full / "images" / p.name)
    table = pd.DataFrame("0", index=range(6), columns=list(LABELS))
    table.insert(0, "Image Index", [p.name for p in images])
    table.loc[2, "Mass"] = "2"
    table.loc[4, "Edema"] = "yes"
    table.to_csv(full / "14_train.csv", index=False)
    d = load_dataset(full, quiet=True)
    assert len(d) == 4 and [(p.line, p.kind) for p in d.problems] == [(4, BAD_LABEL_VALUE), (6, BAD_LABEL_VALUE)]
    assert "label Mass is '2'" in d.problems[0].reason and "'yes'" in d.problems[1].reason


def test_a_file_without_any_usable_row_is_refused_naming_its_problems(tmp_path):
    (tmp_path / "14_train.csv").write_text("Image Index,Finding Labels\na.png,\nb.png,\n")
    with pytest.raises(DatasetError, match=r"no usable row(.|\n)*line 2: a.png: empty Finding Labels"):
        load_dataset(tmp_path)


def test_train_strict_refuses_a_label_file_with_problem_rows(hostile_nih, tmp_path, monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    with pytest.raises(DatasetError, match=r"line 22: .*unknown finding\(s\) \['Covid'\]"):
        cli.main(["train", "--data", str(hostile_nih["root"]), "--strict", "--model", "test_efficientnet",
                  "--image-size", "32", "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "best.safetensors").exists()
    assert STRICT_ENV not in os.environ  # --strict held for that training only


def test_reproduce_strict_refuses_before_running_a_notebook(hostile_nih, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    out = tmp_path / "out"
    code = cli.main(["reproduce", "--strict", "--smoke", "--data-full", str(hostile_nih["root"]), "--only",
                     "data_exploration", "--out", str(out), "--no-progress"])
    assert code == 2 and "line 22" in capsys.readouterr().err
    assert not (out / "notebooks").exists() and STRICT_ENV not in os.environ


@pytest.mark.parametrize("value, strict", [("1", True), ("true", True), ("YES", True), ("0", False),
                                           ("false", False), ("no", False), ("", False)])
def test_strict_mode_from_the_environment(monkeypatch, value, strict):
    from common.labelfiles import strict_default

    monkeypatch.setenv(STRICT_ENV, value)
    assert strict_default(None) is strict and strict_default(not strict) is (not strict)
