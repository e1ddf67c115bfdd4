"""common.data: the three layouts on real files, patient splits without leakage, clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import cli
from common.data import (
    DatasetError,
    combine,
    default_data_dirs,
    load_dataset,
    load_labels,
    patient_split,
)
from common.labels import LABELS
from common.paths import find_data_dir, has_data

# Positives among the 400 images of nih-sample, from its README.
NIH_SAMPLE_POSITIVES = {
    "Atelectasis": 55, "Cardiomegaly": 37, "Effusion": 51, "Infiltration": 79, "Mass": 48, "Nodule": 54,
    "Pneumonia": 20, "Pneumothorax": 29, "Consolidation": 48, "Edema": 12, "Emphysema": 27, "Fibrosis": 36,
    "Pleural_Thickening": 43, "Hernia": 13,
}
RGBA_IDS = {"00001369_000.png", "00004934_000.png", "00005224_000.png", "00005813_000.png"}


@pytest.fixture(scope="module")
def nih(nih_sample):
    return load_dataset(nih_sample, quiet=True)


@pytest.fixture(scope="module")
def cardio(cardiomegaly_64):
    return load_dataset(cardiomegaly_64)


def _link_images(src_paths, dest: Path) -> None:
    """Symlink real images into a tmp layout (never copies image data)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in src_paths:
        os.symlink(p, dest / Path(p).name)


# ------------------------------------------------------------------------------- real layouts
def test_nih_sample_reads_exactly_the_400_images(nih, nih_sample, capsys):
    f = nih.frame
    assert nih.layout == "nih" and not nih.is_synthetic
    assert len(f) == 400 and f["image_id"].is_unique
    assert nih.rows_without_image == 112_120 - 400
    assert {k: int(v) for k, v in f[list(LABELS)].sum().items()} == NIH_SAMPLE_POSITIVES
    assert int((f[list(LABELS)] == 0).all(axis=1).sum()) == 64  # "No Finding"
    assert not f[list(LABELS)].isna().any().any()  # NIH labels every finding
    assert RGBA_IDS <= set(f["image_id"])
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in f["path"])
    assert f["patient_id"].str.fullmatch(r"\d{8}").all()
    assert (f["patient_id"] == f["image_id"].str[:8]).all()  # NIH Patient ID matches the file name
    assert list(f.columns[:4]) == ["image_id", "path", "patient_id", "source"]
    assert [c for c in f.columns if c in LABELS] == list(LABELS)
    assert all(f[c].dtype == np.float32 for c in LABELS)
    assert f["age"].between(0, 120).all() and set(f["sex"]) <= {"M", "F"} and set(f["view"]) <= {"PA", "AP"}
    assert f["official_split"].isna().all()  # nih-sample has no official lists


def test_missing_rows_reported_in_one_line(nih_sample, capsys):
    load_dataset(nih_sample)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "400 images found" in err[0] and "111720" in err[0]


def test_cardiomegaly_64_layout(cardio):
    f = cardio.frame
    assert cardio.layout == "cardiomegaly" and cardio.rows_without_image == 0
    train, test = f[f["official_split"] == "trainval"], f[f["official_split"] == "test"]
    assert (len(train), len(test)) == (459, 118)
    assert (int(train["Cardiomegaly"].sum()), int(test["Cardiomegaly"].sum())) == (55, 26)
    others = [c for c in LABELS if c != "Cardiomegaly"]
    assert f[others].isna().all().all()  # a Cardiomegaly-only source says nothing about the rest
    assert train["path"].str.contains("/train/").all() and test["path"].str.contains("/test/").all()
    # the sample was split by patient: no patient in both folders
    assert not set(train["patient_id"]) & set(test["patient_id"])


def test_unlabelled_cardiomegaly_test_csv(tmp_path, cardio):
    f = cardio.frame
    root = tmp_path / "cardio"
    train, test = f[f["official_split"] == "trainval"].head(6), f[f["official_split"] == "test"].head(4)
    _link_images(train["path"], root / "train")
    _link_images(test["path"], root / "test")
    pd.DataFrame({"imageID": train["image_id"], "disease": ["Cardiomegaly", "No Finding"] * 3}).to_csv(
        root / "train.csv", index=False)
    pd.DataFrame({"imageID": test["image_id"]}).to_csv(root / "test.csv", index=False)  # no disease column
    d = load_dataset(root)
    got = d.frame.set_index("image_id")["Cardiomegaly"]
    assert got[test["image_id"]].isna().all()
    assert list(got[train["image_id"]]) == [1, 0] * 3
    # an empty disease column is unlabelled too
    pd.DataFrame({"imageID": test["image_id"], "disease": [""] * 4}).to_csv(root / "test.csv", index=False)
    assert load_labels(root / "test.csv")["Cardiomegaly"].isna().all()


def test_nih_layout_nested_archives_and_official_lists(tmp_path, nih):
    f = nih.frame.head(30)
    root = tmp_path / "nih"
    _link_images(f["path"][:15], root / "images_001" / "images")
    _link_images(f["path"][15:], root / "images_002" / "images")
    cols = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    text = ["|".join(n for n in LABELS if r[n] == 1) or "No Finding" for _, r in f.iterrows()]
    rows = pd.DataFrame({"Image Index": f["image_id"], "Finding Labels": text, "Follow-up #": 0,
                         "Patient ID": f["patient_id"].astype(int), "Patient Age": f["age"].astype(int),
                         "Patient Gender": f["sex"], "View Position": f["view"]})[cols]
    extra = rows.head(5).assign(**{"Image Index": [f"9999999{i}_000.png" for i in range(5)]})
    pd.concat([rows, extra]).to_csv(root / "Data_Entry_2017.csv", index=False)
    (root / "test_list.txt").write_text("\n".join(f["image_id"][:10]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(f["image_id"][10:]) + "\n")
    d = load_dataset(root, name="mine", quiet=True)
    assert len(d) == 30 and d.rows_without_image == 5 and (d.frame["source"] == "mine").all()
    assert (d.frame.set_index("image_id").loc[f["image_id"], list(LABELS)].to_numpy()
            == f[list(LABELS)].to_numpy()).all()
    assert d.frame["official_split"].value_counts().to_dict() == {"trainval": 20, "test": 10}
    split = patient_split(d.frame, seed=3)
    assert set(d.frame.loc[split == "test", "image_id"]) == set(f["image_id"][:10])


def test_dataset_full_layout(tmp_path, nih):
    f = nih.frame.head(12)
    root = tmp_path / "full"
    _link_images(f["path"], root / "sample" / "images")
    text = ["|".join(n for n in LABELS if r[n] == 1) or "No Finding" for _, r in f.iterrows()]
    pd.DataFrame({"Image Index": f["image_id"], "Finding Labels": text}).to_csv(root / "14_train.csv", index=False)
    os.symlink(root, root / "sample" / "loop")  # a symlink loop must not hang the scan
    d = load_dataset(root)
    assert d.layout == "full" and len(d) == 12
    np.testing.assert_array_equal(d.frame[list(LABELS)].to_numpy(), f[list(LABELS)].to_numpy())
    assert (d.frame["patient_id"] == f["image_id"].str[:8].to_numpy()).all()  # from the file name
    np.testing.assert_array_equal(load_labels(root / "14_train.csv").to_numpy(), f[list(LABELS)].to_numpy())


# ------------------------------------------------------------------------------------ splits
def test_patient_split_has_no_leakage_on_real_data(nih, cardio):
    both = combine([nih, cardio])
    assert both.layout == "combined" and len(both) == 977 and set(both.frame["source"]) == {nih.name, cardio.name}
    split = patient_split(both.frame, seed=0)
    assert split.index.equals(both.frame.index)
    per_patient = pd.crosstab(both.frame["patient_id"], split).gt(0).sum(axis=1)
    assert (per_patient == 1).all()  # every patient in exactly one split
    # the cardiomegaly set's own test folder stays the test split, its train folder never is
    official = both.frame["official_split"]
    assert (split[official == "test"] == "test").all() and (split[official == "trainval"] != "test").all()
    nih_split = split[both.frame["source"] == nih.name].value_counts(normalize=True)
    assert abs(nih_split["train"] - 0.7) < 0.05 and abs(nih_split["dev"] - 0.1) < 0.05
    assert abs(nih_split["test"] - 0.2) < 0.05


def test_patient_split_is_deterministic_and_seeded(cardio):
    frame = cardio.frame
    a, b = patient_split(frame, seed=7), patient_split(frame, seed=7)
    assert a.equals(b)
    assert not a.equals(patient_split(frame, seed=8))
    shuffled = frame.sample(frac=1.0, random_state=1)
    assert patient_split(shuffled, seed=7).reindex(frame.index).equals(a)  # row order does not matter
    no_official = frame.drop(columns="official_split")
    s = patient_split(no_official, seed=0, fractions=(0.6, 0.2, 0.2))
    assert set(s) == {"train", "dev", "test"}
    assert (pd.crosstab(no_official["patient_id"], s).gt(0).sum(axis=1) == 1).all()
    with pytest.raises(ValueError, match="fractions"):
        patient_split(frame, fractions=(0.5, 0.5))


# ------------------------------------------------------------------------------------ labels
def test_load_labels_without_images(nih_sample, cardiomegaly_64, nih):
    full = load_labels(nih_sample / "Data_Entry_2017_v2020.csv")
    assert full.shape == (112_120, 14) and list(full.columns) == list(LABELS)
    sub = full.loc[nih.frame["image_id"]]
    assert {k: int(v) for k, v in sub.sum().items()} == NIH_SAMPLE_POSITIVES
    assert load_labels(nih_sample).shape == (112_120, 14)
    cardio = load_labels(cardiomegaly_64)
    assert cardio.shape == (577, 14) and int(cardio["Cardiomegaly"].sum()) == 81
    assert int(load_labels(cardiomegaly_64 / "test.csv")["Cardiomegaly"].sum()) == 26


# ------------------------------------------------------------------------------------ errors
def test_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found(.|\n)*NIH official"):
        load_dataset(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no label file(.|\n)*Data_Entry_2017_v2020.csv"):
        load_dataset(empty)
    with pytest.raises(DatasetError, match="no such label file"):
        load_labels(tmp_path / "missing.csv")


@pytest.mark.parametrize("label_file, text, error", [
    ("Data_Entry_2017.csv", "Image Index,Labels\na.png,Mass\n", r"missing column\(s\) \['Finding Labels', 'Patient ID'\]"),
    ("14_train.csv", "Image Index,Finding Labels\na.png,Mass\nb.png,Broken Leg\n", "line 3(.|\n)*Broken Leg"),
    ("14_train.csv", "foo,bar\n1,2\n", "image id column"),
    ("14_train.csv", "Image Index,Finding Labels\na.png,Mass\n", "none of the 1 images"),
], ids=["missing-columns", "unknown-finding", "no-image-column", "no-image-found"])
def test_a_bad_label_file_is_a_clear_error(tmp_path, label_file, text, error):
    (tmp_path / label_file).write_text(text)
    with pytest.raises(DatasetError, match=error):
        load_dataset(tmp_path, strict=True)  # strict: an unknown finding refuses the file (tests/test_bad_rows.py)


# ------------------------------------------------------------------------------- default dirs
def test_default_data_dirs(tmp_path, monkeypatch, nih_sample):
    import common.synthetic as synthetic

    monkeypatch.setenv("MEDIMAGING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "DEFAULT_SIZES", {"nih": 24, "cardiomegaly": 12})  # small for speed
    full, cardio = tmp_path / "full", tmp_path / "cardio"
    full.mkdir()
    (full / "README.md").write_text("put data here\n")  # a README alone is still empty
    dirs, synthetic_flag = default_data_dirs(full, cardio)
    assert synthetic_flag and [p.name for p in dirs] == ["nih", "cardiomegaly"]
    assert dirs[0].parent == tmp_path / "cache" / "synthetic-v1"
    data = [load_dataset(p, quiet=True) for p in dirs]
    assert [len(d) for d in data] == [24, 12] and all(d.is_synthetic for d in data)
    assert combine(data).is_synthetic
    stamp = (dirs[0] / "Data_Entry_2017_v2020.csv").stat().st_mtime_ns
    assert default_data_dirs(full, cardio) == (dirs, True)
    assert (dirs[0] / "Data_Entry_2017_v2020.csv").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert not list((tmp_path / "cache").glob(".synthetic-v1.*"))  # no temporary folder left behind
    os.symlink(nih_sample / "Data_Entry_2017_v2020.csv", full / "Data_Entry_2017_v2020.csv")
    assert default_data_dirs(full, cardio) == ([full.resolve()], False)



def test_a_data_folder_is_found_upwards_then_at_the_repository(tmp_path, monkeypatch):
    from common import paths

    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "dataset_full").mkdir()
    monkeypatch.chdir(repo / "notebooks")  # a notebook runs in its own folder
    assert find_data_dir("dataset_full") == (repo / "dataset_full").resolve()
    (repo / "notebooks" / "dataset_full").mkdir()
    assert find_data_dir("dataset_full") == (repo / "notebooks" / "dataset_full").resolve()  # the nearest wins
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a command run outside the checkout finds the checkout's folder
    monkeypatch.setattr(paths, "REPO_ROOT", repo)
    assert find_data_dir("dataset_full") == (repo / "dataset_full").resolve()
    assert find_data_dir("nowhere") == (elsewhere / "nowhere").resolve()
    assert find_data_dir(tmp_path / "abs") == (tmp_path / "abs").resolve()  # an absolute path is itself
    assert not has_data(repo / "dataset_full") and not has_data(elsewhere / "nowhere")
    (repo / "dataset_full" / "README.md").write_text("put data here\n")
    assert not has_data(repo / "dataset_full")
    (repo / "dataset_full" / "14_train.csv").write_text("Image Index,Finding Labels\n")
    assert has_data(repo / "dataset_full")

# ----------------------------------------------------------------------------------- summary
def test_data_summary_json(nih_sample, capsys):
    assert cli.main(["data", "summary", str(nih_sample), "--json"]) == 0
    out = capsys.readouterr().out
    s = json.loads(out)  # exactly one JSON object on stdout
    assert s["images_found"] == 400 and s["rows_without_image"] == 111_720
    assert s["unreadable"] == [] and s["patients"] == 400
    assert s["positives"] == NIH_SAMPLE_POSITIVES


def test_data_summary_reports_broken_files(tmp_path, cardio, capsys):
    f = cardio.frame[cardio.frame["official_split"] == "trainval"].head(5)
    root = tmp_path / "c"
    _link_images(f["path"][:4], root / "train")
    (root / "train" / f["image_id"].iloc[4]).write_bytes(b"not a png at all")
    pd.DataFrame({"imageID": f["image_id"], "disease": "No Finding"}).to_csv(root / "train.csv", index=False)
    assert cli.main(["data", "summary", str(root), "--json", "--size", "32"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["images_found"] == 5
    assert [u["path"].endswith(f["image_id"].iloc[4]) for u in s["unreadable"]] == [True]
    assert "not an image" in s["unreadable"][0]["reason"]
    assert cli.main(["data", "summary", str(root), "--size", "32"]) == 0
    table = capsys.readouterr().out
    assert "unreadable images                 1" in table and "Cardiomegaly" in table
    assert cli.main(["data", "summary", str(tmp_path / "absent")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
