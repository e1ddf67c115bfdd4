"""common.metrics against scikit-learn and brute force, with NaN-masked labels."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from common.labels import LABELS
from common.metrics import (
    _auroc_plan,
    _weighted_auroc,
    baseline_all_absent_accuracy,
    bootstrap_auroc_ci,
    evaluate_predictions,
    format_table,
    paired_auroc_difference,
    per_label_accuracy,
    per_label_auprc,
    per_label_auroc,
    plot_roc,
    threshold_metrics,
    tune_thresholds,
)

CONTRACT_KEYS = {"n_images", "labels", "n_positive", "auroc", "auroc_ci", "mean_auroc", "mean_auroc_ci", "auprc",
                 "mean_auprc", "accuracy", "mean_accuracy", "thresholds", "sensitivity", "specificity", "f1",
                 "baseline_all_absent_accuracy", "mean_baseline_all_absent_accuracy"}


@pytest.fixture(scope="module")
def data():
    """600 images x 14 labels, rare positives, informative scores with ties, 25% unlabelled."""
    rng = np.random.default_rng(7)
    n = 600
    y = (rng.random((n, 14)) < np.linspace(0.03, 0.3, 14)).astype(np.float64)
    p = np.clip(0.35 * y + 0.65 * rng.random((n, 14)), 0, 1)
    p[:, 2] = np.round(p[:, 2], 1)  # heavy ties
    y[rng.random((n, 14)) < 0.25] = np.nan
    return y, p


def _masked(y, p, j):
    m = ~np.isnan(y[:, j])
    return y[m, j], p[m, j]


def test_auroc_is_sklearn_exactly(data):
    y, p = data
    auroc = per_label_auroc(y, p, LABELS)
    assert list(auroc) == list(LABELS)
    for j, name in enumerate(LABELS):
        assert auroc[name] == roc_auc_score(*_masked(y, p, j))


def test_auprc_and_accuracy_and_baseline(data):
    y, p = data
    auprc = per_label_auprc(y, p, LABELS)
    acc = per_label_accuracy(y, p, LABELS)
    base = baseline_all_absent_accuracy(y, LABELS)
    for j, name in enumerate(LABELS):
        yt, ps = _masked(y, p, j)
        assert auprc[name] == pytest.approx(average_precision_score(yt, ps), abs=1e-15)
        assert acc[name] == pytest.approx(np.mean((ps >= 0.5).astype(float) == yt))
        assert base[name] == pytest.approx(np.mean(yt == 0))


def test_masked_entries_do_not_count(data):
    y, p = data
    p2 = p.copy()
    p2[np.isnan(y)] = 1.0 - p2[np.isnan(y)]  # scramble predictions where there is no label
    r1 = evaluate_predictions(y, p, LABELS, n_boot=0)
    r2 = evaluate_predictions(y, p2, LABELS, n_boot=0)
    for key in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1"):
        assert r1[key] == r2[key], key
    assert r1["n_labelled"]["Atelectasis"] == int((~np.isnan(y[:, 0])).sum())


def test_undefined_auroc_is_none_and_mean_is_over_defined_labels():
    y = np.array([[1, 0, np.nan], [0, 0, np.nan], [1, 0, np.nan], [0, 0, np.nan]], dtype=float)
    p = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.5], [0.6, 0.2, 0.5], [0.4, 0.8, 0.5]])
    r = evaluate_predictions(y, p, ["A", "B", "C"], n_boot=50)
    assert r["auroc"] == {"A": 1.0, "B": None, "C": None}
    assert r["mean_auroc"] == 1.0
    assert r["auroc_ci"]["B"] is None and r["auprc"]["B"] is None
    assert r["accuracy"]["C"] is None and r["accuracy"]["B"] == 0.75
    assert r["mean_accuracy"] == pytest.approx((1.0 + 0.75) / 2)
    assert r["sensitivity"]["B"] is None and r["specificity"]["B"] == 0.75


def test_weighted_auroc_core_equals_sklearn_on_resamples(data):
    y, p = data
    rng = np.random.default_rng(0)
    for j in (0, 2, 13):
        yt, ps = _masked(y, p, j)
        plan = _auroc_plan(yt, ps)
        idx = rng.integers(0, yt.size, size=(5, yt.size))
        counts = np.stack([np.bincount(i, minlength=yt.size) for i in idx]).astype(float)
        got = _weighted_auroc(plan, counts)
        want = [roc_auc_score(yt[i], ps[i]) for i in idx]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_bootstrap_ci_contains_estimate_and_is_seeded(data):
    y, p = data
    auroc = per_label_auroc(y, p, LABELS)
    ci, mean_ci = bootstrap_auroc_ci(y, p, LABELS, n_boot=300, seed=1)
    for name in LABELS:
        lo, hi = ci[name]
        assert lo < auroc[name] < hi, name
        assert hi - lo < 0.5
    mean = np.mean(list(auroc.values()))
    assert mean_ci[0] < mean < mean_ci[1]
    assert mean_ci[1] - mean_ci[0] < min(hi - lo for lo, hi in ci.values())  # averaging narrows it
    assert bootstrap_auroc_ci(y, p, LABELS, n_boot=300, seed=1) == (ci, mean_ci)
    assert bootstrap_auroc_ci(y, p, LABELS, n_boot=300, seed=2)[1] != mean_ci


def test_bootstrap_interval_shrinks_with_more_images():
    rng = np.random.default_rng(3)

    def width(n):
        y = (rng.random((n, 1)) < 0.3).astype(float)
        p = np.clip(0.3 * y + 0.7 * rng.random((n, 1)), 0, 1)
        lo, hi = bootstrap_auroc_ci(y, p, ["A"], n_boot=400)[0]["A"]
        return hi - lo

    assert width(4000) < width(250) / 2


@pytest.mark.parametrize("method", ["youden", "f1"])
def test_tuned_thresholds_are_optimal(data, method):
    y, p = data
    thr = tune_thresholds(y, p, LABELS, method=method)
    for j, name in enumerate(LABELS[:6]):
        yt, ps = _masked(y, p, j)

        def score(t):  # brute force from the confusion counts
            pred = ps >= t
            tp, fp = np.sum(pred & (yt == 1)), np.sum(pred & (yt == 0))
            fn, tn = np.sum(~pred & (yt == 1)), np.sum(~pred & (yt == 0))
            return 2 * tp / (2 * tp + fp + fn) if method == "f1" else tp / (tp + fn) - fp / (fp + tn)

        best = max(score(t) for t in np.unique(ps))
        assert score(thr[name]) == pytest.approx(best, abs=1e-12), name
        if method == "f1":
            assert f1_score(yt, ps >= thr[name]) == pytest.approx(best, abs=1e-12)


def test_threshold_metrics_match_confusion_matrix(data):
    y, p = data
    thr = {name: 0.3 + 0.02 * j for j, name in enumerate(LABELS)}
    m = threshold_metrics(y, p, LABELS, thr)
    for j, name in enumerate(LABELS):
        yt, ps = _masked(y, p, j)
        tn, fp, fn, tp = confusion_matrix(yt, ps >= thr[name], labels=[0, 1]).ravel()
        assert m["sensitivity"][name] == pytest.approx(tp / (tp + fn))
        assert m["specificity"][name] == pytest.approx(tn / (tn + fp))
        assert m["f1"][name] == pytest.approx(f1_score(yt, ps >= thr[name]))


def test_evaluate_predictions_contract_and_json(data):
    y, p = data
    thr = tune_thresholds(y, p, LABELS)
    r = evaluate_predictions(y, p, LABELS, thresholds=thr, n_boot=100, seed=0)
    assert CONTRACT_KEYS <= set(r)
    assert r["n_images"] == 600 and r["labels"] == list(LABELS)
    assert r["thresholds"] == thr
    assert r["n_positive"]["Hernia"] == int(np.nansum(y[:, 13]))
    assert r["mean_auroc"] == pytest.approx(np.mean(list(r["auroc"].values())))
    json.dumps(r, allow_nan=False)  # strictly JSON: no NaN, no numpy types
    with pytest.raises(ValueError, match="no value for"):
        evaluate_predictions(y, p, LABELS, thresholds={"Atelectasis": 0.5}, n_boot=0)


def test_invalid_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        per_label_auroc(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="1, 0 or NaN"):
        per_label_auroc(np.array([[2.0], [0.0]]), np.array([[0.1], [0.2]]))
    with pytest.raises(ValueError, match="must be finite"):
        per_label_auroc(np.array([[1.0], [0.0]]), np.array([[np.nan], [0.2]]))
    with pytest.raises(ValueError, match="3 label names for 2 columns"):
        per_label_auroc(np.zeros((3, 2)), np.zeros((3, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="youden"):
        tune_thresholds(np.zeros((3, 1)), np.zeros((3, 1)), method="best")


def test_format_table(data):
    y, p = data
    y = y.copy()
    y[:, 13] = 0  # Hernia: no positives -> AUROC n/a
    r = evaluate_predictions(y, p, LABELS, n_boot=50)
    table = format_table(r)
    lines = table.splitlines()
    assert len(lines) == 2 + len(LABELS) + 1
    assert lines[0].startswith("| Label |") and "AUROC (95% CI)" in lines[0]
    atel = next(line for line in lines if line.startswith("| Atelectasis |"))
    assert f"{r['auroc']['Atelectasis']:.3f} ({r['auroc_ci']['Atelectasis'][0]:.3f}-" in atel
    assert f"| {r['accuracy']['Atelectasis']:.3f} |" in atel
    assert "| Hernia | 0 / " in table and "n/a" in next(line for line in lines if line.startswith("| Hernia"))
    assert lines[-1].startswith("| **Mean** |") and f"{r['mean_auroc']:.3f}" in lines[-1]


def test_plot_roc(data):
    y, p = data
    y = y.copy()
    y[:, 5] = np.nan  # a label with nothing labelled gets no curve
    fig = plot_roc(y, p, LABELS, title="SYNTHETIC test")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 13 + 1  # 13 labels + the chance diagonal
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    auroc = per_label_auroc(y, p, LABELS)
    assert f"Atelectasis ({auroc['Atelectasis']:.3f})" in texts and not any("Nodule" in t for t in texts)
    diag = ax.lines[-1]
    assert list(diag.get_xdata()) == [0, 1] == list(diag.get_ydata())
    assert ax.get_title() == "SYNTHETIC test"


def test_metrics_does_not_import_torch():
    code = "import sys, common.metrics; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_paired_difference_resamples_both_models_alike_and_is_narrower_than_either_interval():
    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random((n, 3)) < 0.3).astype(float)
    y[300:, 1:] = np.nan  # a Cardiomegaly-only share: labels unknown for the rest
    noise = rng.random((n, 3))
    a = np.clip(0.25 * np.nan_to_num(y) + 0.75 * noise, 0, 1)
    b = np.clip(0.29 * np.nan_to_num(y) + 0.75 * noise, 0, 1)  # the same images' noise: b is a better a
    names = ["A", "B", "C"]
    d = paired_auroc_difference(y, b, a, names, n_boot=500, seed=0)
    point = {k: per_label_auroc(y, b, names)[k] - per_label_auroc(y, a, names)[k] for k in names}
    assert d["labels"]["B"]["mean"] == pytest.approx(point["B"])
    assert d["mean"] == pytest.approx(np.mean(list(point.values())))
    lo, hi = d["ci"]
    assert 0 < lo < d["mean"] < hi  # b is better on every resample's mean
    own_a, own_b = bootstrap_auroc_ci(y, a, names, n_boot=500)[1], bootstrap_auroc_ci(y, b, names, n_boot=500)[1]
    assert own_b[0] < own_a[1]  # the two own intervals overlap...
    assert hi - lo < min(own_a[1] - own_a[0], own_b[1] - own_b[0]) / 2  # ...the paired one is far narrower
    same = paired_auroc_difference(y, a, a, names, n_boot=200)
    assert same["mean"] == 0 and same["ci"] == [0.0, 0.0]
    assert paired_auroc_difference(y, b, a, names, n_boot=0)["ci"] is None
