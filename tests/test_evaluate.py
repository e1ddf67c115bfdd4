"""`medimaging evaluate` end to end against the real NIH Data_Entry csv of the sample data."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from common.cli import main
from common.labels import LABELS, parse_findings

N_IMAGES = 300


@pytest.fixture(scope="module")
def data_entry(nih_sample):
    return next(nih_sample.glob("Data_Entry_2017*.csv"))


@pytest.fixture(scope="module")
def truth(data_entry, nih_sample):
    """Labels of N_IMAGES sample images, parsed here independently of common.data."""
    ids = sorted(p.name for p in (nih_sample / "images").glob("*.png"))[:N_IMAGES]
    entry = pd.read_csv(data_entry, usecols=["Image Index", "Finding Labels"]).set_index("Image Index")
    findings = entry.loc[ids, "Finding Labels"].map(parse_findings)
    return pd.DataFrame([[float(n in f) for n in LABELS] for f in findings], index=ids, columns=list(LABELS))


@pytest.fixture(scope="module")
def probs(truth):
    rng = np.random.default_rng(0)
    return np.clip(0.35 * truth.to_numpy() + 0.65 * rng.random(truth.shape), 0, 1)


def _write(path, ids, probs, names, prefix="prob_"):
    frame = pd.DataFrame(probs, columns=[prefix + n for n in names])
    frame.insert(0, "Image Index", list(ids))
    frame.to_csv(path, index=False)
    return path


def _evaluate(capsys, *argv):
    rc = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_end_to_end_matches_sklearn(tmp_path, capsys, data_entry, truth, probs):
    pred = _write(tmp_path / "pred.csv", truth.index, probs, LABELS)
    rc, out, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry, "--json", tmp_path / "m.json",
                             "--n-boot", 200)
    assert rc == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n_images"] == N_IMAGES and result["labels"] == list(LABELS)
    for j, name in enumerate(LABELS):
        assert result["auroc"][name] == roc_auc_score(truth[name], probs[:, j])
        assert result["accuracy"][name] == pytest.approx(np.mean((probs[:, j] >= 0.5) == (truth[name] == 1)))
        assert result["n_positive"][name] == int(truth[name].sum())
    assert result["mean_auroc"] == pytest.approx(np.mean(list(result["auroc"].values())))
    assert result["mean_accuracy"] == pytest.approx(np.mean(list(result["accuracy"].values())))
    # the printed table: every label with AUROC, its CI, AUPRC, accuracy and positives
    row = next(line for line in out.splitlines() if line.startswith("| Cardiomegaly |"))
    ci = result["auroc_ci"]["Cardiomegaly"]
    assert f"{result['auroc']['Cardiomegaly']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" in row
    assert f"| {int(truth['Cardiomegaly'].sum())} / {N_IMAGES} |" in row
    assert f"{result['auprc']['Cardiomegaly']:.3f}" in row
    assert all(f"| {name} |" in out for name in LABELS)


def test_plain_label_columns_and_thresholds(tmp_path, capsys, data_entry, truth, probs):
    pred = _write(tmp_path / "pred.csv", truth.index, probs, LABELS, prefix="")
    thresholds = {name: 0.4 for name in LABELS}
    (tmp_path / "thr.json").write_text(json.dumps(thresholds))
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry, "--thresholds", tmp_path / "thr.json",
                           "--json", tmp_path / "m.json", "--n-boot", 0)
    assert rc == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["thresholds"] == thresholds
    y, s = truth["Effusion"].to_numpy(), probs[:, LABELS.index("Effusion")]
    assert result["sensitivity"]["Effusion"] == pytest.approx(np.mean(s[y == 1] >= 0.4))
    assert result["specificity"]["Effusion"] == pytest.approx(np.mean(s[y == 0] < 0.4))


def test_cardiomegaly_run_evaluates_its_one_label(tmp_path, capsys, data_entry, truth, probs):
    j = LABELS.index("Cardiomegaly")
    pred = _write(tmp_path / "pred.csv", truth.index, probs[:, [j]], ["Cardiomegaly"])
    rc, out, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry, "--json", tmp_path / "m.json",
                             "--n-boot", 0)
    assert rc == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["labels"] == ["Cardiomegaly"]
    assert result["auroc"]["Cardiomegaly"] == roc_auc_score(truth["Cardiomegaly"], probs[:, j])
    assert "| Atelectasis |" not in out


def test_cardiomegaly_layout_as_labels(tmp_path, capsys, cardiomegaly_64):
    train = pd.read_csv(cardiomegaly_64 / "train.csv")
    y = (train["disease"] == "Cardiomegaly").to_numpy(float)
    p = np.clip(0.5 * y + 0.5 * np.random.default_rng(1).random(len(y)), 0, 1)
    pred = _write(tmp_path / "pred.csv", train["imageID"], p[:, None], ["Cardiomegaly"])
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", cardiomegaly_64, "--json", tmp_path / "m.json",
                           "--n-boot", 0)
    assert rc == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["auroc"]["Cardiomegaly"] == roc_auc_score(y, p)


def test_subset_needs_explicit_labels(tmp_path, capsys, data_entry, truth, probs):
    names = [n for n in LABELS if n not in ("Hernia", "Edema")]
    pred = _write(tmp_path / "pred.csv", truth.index, probs[:, :12], names)
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry)
    assert rc == 2 and "12 of the 14 labels" in err and "Edema, Hernia (2)" in err and "--label" in err
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry, "--label", "Mass",
                           "--label", "Nodule", "--json", tmp_path / "m.json", "--n-boot", 0)
    assert rc == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["labels"] == ["Mass", "Nodule"]
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry, "--task", "all14")
    assert rc == 2 and "no prediction column for Edema, Hernia" in err


def test_images_not_in_labels_are_named(tmp_path, capsys, data_entry, truth, probs):
    ids = list(truth.index[:-3]) + ["99999999_000.png", "99999999_001.png", "99999999_002.png"]
    pred = _write(tmp_path / "pred.csv", ids, probs, LABELS)
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry)
    assert rc == 2
    assert "3 of its 300 images are not in" in err and "99999999_000.png" in err


@pytest.mark.parametrize("problem,expect", [
    ("no_image_column", "no 'Image Index' column"),
    ("unknown_label", "unknown labels: prob_Cardiomegally"),
    ("duplicate", "more than once: 00000"),
    ("out_of_range", "outside [0, 1]"),
    ("empty_cell", "empty or non-numeric"),
    ("both_names", "has two columns"),
])
def test_bad_prediction_files(tmp_path, capsys, data_entry, truth, probs, problem, expect):
    frame = pd.read_csv(_write(tmp_path / "p.csv", truth.index, probs, LABELS))
    if problem == "no_image_column":
        frame = frame.rename(columns={"Image Index": "image"})
    elif problem == "unknown_label":
        frame["prob_Cardiomegally"] = 0.5
    elif problem == "duplicate":
        frame = pd.concat([frame, frame.iloc[:1]])
    elif problem == "out_of_range":
        frame.loc[3, "prob_Mass"] = 2.5  # logits instead of probabilities
    elif problem == "empty_cell":
        frame.loc[5, "prob_Edema"] = np.nan
    elif problem == "both_names":
        frame["Mass"] = frame["prob_Mass"]
    frame.to_csv(tmp_path / "bad.csv", index=False)
    rc, out, err = _evaluate(capsys, "--predictions", tmp_path / "bad.csv", "--labels", data_entry)
    assert rc == 2 and expect in err and err.startswith("medimaging evaluate: error: ")
    assert "bad.csv" in err and out == ""


def test_missing_files_and_bad_thresholds(tmp_path, capsys, data_entry, truth, probs):
    pred = _write(tmp_path / "pred.csv", truth.index, probs, LABELS)
    rc, _, err = _evaluate(capsys, "--predictions", tmp_path / "none.csv", "--labels", data_entry)
    assert rc == 2 and "none.csv: predictions file not found" in err
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", tmp_path / "nolabels")
    assert rc == 2 and "nolabels" in err
    (tmp_path / "thr.json").write_text(json.dumps({"Mass": 0.3}))
    rc, _, err = _evaluate(capsys, "--predictions", pred, "--labels", data_entry, "--thresholds", tmp_path / "thr.json")
    assert rc == 2 and "no threshold for Atelectasis" in err


def test_command_line_entry_point(tmp_path, data_entry, truth, probs):
    pred = _write(tmp_path / "pred.csv", truth.index[:50], probs[:50], LABELS)
    proc = subprocess.run([sys.executable, "-m", "common", "evaluate", "--predictions", str(pred), "--labels",
                           str(data_entry), "--n-boot", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "50 images, 14 label(s)" in proc.stdout and "| **Mean** |" in proc.stdout


def test_the_library_scores_what_predict_writes(tmp_path, data_entry, truth, probs):
    from common.evaluate import EvaluationError, evaluate_files
    from common.serving import Prediction, write_predictions_csv

    rows = [Prediction(str(tmp_path / i), dict(zip(LABELS, map(float, p))), []) for i, p in zip(truth.index, probs)]
    write_predictions_csv(rows, LABELS, tmp_path / "pred.csv")
    result = evaluate_files(tmp_path / "pred.csv", data_entry, n_boot=0)
    assert result["n_images"] == N_IMAGES and result["labels"] == list(LABELS)
    y, p = truth["Mass"].to_numpy(), probs[:, LABELS.index("Mass")]
    assert result["auroc"]["Mass"] == pytest.approx(roc_auc_score(y, np.round(p, 5)), abs=1e-3)  # csv keeps 6 digits
    with pytest.raises(EvaluationError, match="give --label or --task"):
        evaluate_files(tmp_path / "pred.csv", data_entry, label_names=["Mass"], task="all14")


def test_building_the_parser_stays_light():
    # every subcommand's arguments are built for `medimaging --help`: evaluation's pandas and
    # scikit-learn load only when it runs
    code = ("import sys, common.cli as c; c.build_parser(); "
            "print(sorted({'pandas', 'sklearn', 'torch'} & {m.split('.')[0] for m in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
