"""Metrics for multi-label predictions with missing labels (numpy + scikit-learn, no torch).

Inputs everywhere: `y_true` [N, L] with 1 / 0 / NaN (NaN = this image is not labelled for this
finding, e.g. a Cardiomegaly-only dataset), `y_prob` [N, L] probabilities, `labels` the L names.
Each label is scored on its labelled images only. A metric that is undefined for a label (AUROC
with only one class present, sensitivity without positives...) is None, and means are taken over
the labels where it is defined.

- accuracy at 0.5: the original study's metric (share of images whose thresholded probability equals
  the label); `baseline_all_absent_accuracy` is what predicting "absent" everywhere scores on it.
- AUROC: scikit-learn's `roc_auc_score` itself; its 95% CI from a vectorised bootstrap; two models
  on the same images compare by `paired_auroc_difference` (one bootstrap, the same resamples).
- AUPRC: scikit-learn's `average_precision_score`.
- sensitivity / specificity / F1 at per-label thresholds tuned on the dev split (`tune_thresholds`).

A probability counts as positive when it is >= the threshold (scikit-learn's convention).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from common.labels import LABELS


def _as_arrays(y_true, y_prob, labels: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate and return float arrays [N, L] and the label names."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if p.ndim == 1:
        p = p[:, None]
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape} but y_prob has shape {p.shape}; they must match (images x labels)")
    if labels is None:
        labels = list(LABELS) if t.shape[1] == len(LABELS) else [f"label_{i}" for i in range(t.shape[1])]
    labels = list(labels)
    if len(labels) != t.shape[1]:
        raise ValueError(f"{len(labels)} label names for {t.shape[1]} columns")
    known = t[~np.isnan(t)]
    if known.size and not np.isin(known, (0.0, 1.0)).all():
        bad = np.unique(known[~np.isin(known, (0.0, 1.0))])[:5]
        raise ValueError(f"y_true must hold 1, 0 or NaN; found {bad.tolist()}")
    if not np.isfinite(p).all():
        cols = [labels[j] for j in np.where(~np.isfinite(p).all(axis=0))[0]]
        raise ValueError(f"y_prob has NaN or infinite values (labels {cols[:5]}); predictions must be finite")
    return t, p, labels


def _columns(t: np.ndarray, p: np.ndarray):
    """Per label: (labelled targets, their probabilities)."""
    for j in range(t.shape[1]):
        mask = ~np.isnan(t[:, j])
        yield t[mask, j], p[mask, j]


def _mean(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def per_label_accuracy(y_true, y_prob, labels=None, threshold: float | dict = 0.5) -> dict[str, float | None]:
    """Share of labelled images whose thresholded probability equals the label (the study's metric)."""
    t, p, labels = _as_arrays(y_true, y_prob, labels)
    out = {}
    for name, (y, s) in zip(labels, _columns(t, p)):
        thr = threshold[name] if isinstance(threshold, dict) else threshold
        out[name] = float(np.mean((s >= thr) == (y == 1))) if y.size else None
    return out


def baseline_all_absent_accuracy(y_true, labels=None) -> dict[str, float | None]:
    """Accuracy of predicting "absent" for every image: the share of labelled negatives."""
    t = np.asarray(y_true, dtype=np.float64)
    t, _, labels = _as_arrays(t, np.zeros_like(t), labels)
    return {name: (float(np.mean(y == 0)) if y.size else None) for name, (y, _) in zip(labels, _columns(t, t))}


def per_label_auroc(y_true, y_prob, labels=None) -> dict[str, float | None]:
    """AUROC per label (scikit-learn's roc_auc_score); None where a label has only one class."""
    t, p, labels = _as_arrays(y_true, y_prob, labels)
    return {name: (float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else None)
            for name, (y, s) in zip(labels, _columns(t, p))}


def per_label_auprc(y_true, y_prob, labels=None) -> dict[str, float | None]:
    """Area under the precision-recall curve (average precision); None without positives."""
    t, p, labels = _as_arrays(y_true, y_prob, labels)
    return {name: (float(average_precision_score(y, s)) if y.sum() > 0 else None)
            for name, (y, s) in zip(labels, _columns(t, p))}


def _auroc_plan(y: np.ndarray, s: np.ndarray, index: np.ndarray | None = None) -> tuple:
    """Precompute one label's weighted-AUROC lookups: (sorted negative indices, positive indices,
    and each positive's first/after-last position among the sorted negative scores)."""
    index = np.arange(y.size) if index is None else index
    pos, neg = y == 1, y == 0
    order = np.argsort(s[neg], kind="mergesort")
    neg_scores = s[neg][order]
    lo = np.searchsorted(neg_scores, s[pos], side="left")
    hi = np.searchsorted(neg_scores, s[pos], side="right")
    return index[neg][order], index[pos], lo, hi


def _weighted_auroc(plan: tuple, weights: np.ndarray) -> np.ndarray:
    """AUROC of one label under B weightings of the images at once: weights [B, N] -> [B].

    Mann-Whitney with ties counted half: each positive beats the negatives scored lower and ties
    with those scored the same. With the negatives sorted once (`_auroc_plan`), a cumulative sum
    of their weights gives every positive's count by lookup, so a bootstrap resample (its counts
    as weights) costs no sort.
    """
    neg_idx, pos_idx, lo, hi = plan
    w_pos = weights[:, pos_idx]
    cum = np.zeros((weights.shape[0], neg_idx.size + 1))
    np.cumsum(weights[:, neg_idx], axis=1, out=cum[:, 1:])
    wins = 0.5 * (cum[:, lo] + cum[:, hi])  # below + half of the ties
    n_pos, n_neg = w_pos.sum(axis=1), cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (w_pos * wins).sum(axis=1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _bootstrap_aurocs(t: np.ndarray, p: np.ndarray, n_boot: int, seed: int, chunk: int | None = None) -> np.ndarray:
    """Each label's AUROC under `n_boot` resamples of the images: [n_boot, labels], NaN where a
    resample leaves a label one class. The resamples depend only on (seed, images), so two models'
    scores of the same images drawn with one seed are resampled alike (`paired_auroc_difference`)."""
    n, n_labels = t.shape
    rng = np.random.default_rng(seed)
    # resamples per block: ~100k weights keeps the working arrays in cache (measured faster than big blocks)
    chunk = chunk or min(256, max(8, 100_000 // n))
    aucs = np.full((n_boot, n_labels), np.nan)
    plans = {}
    for j in range(n_labels):
        mask = ~np.isnan(t[:, j])
        y = t[mask, j]
        if 0 < y.sum() < y.size:
            plans[j] = _auroc_plan(y, p[mask, j], np.flatnonzero(mask))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        # resample counts per image: one bincount for the whole chunk
        counts = np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n)
        counts = counts.reshape(b, n).astype(np.float64)
        for j, plan in plans.items():
            aucs[start:start + b, j] = _weighted_auroc(plan, counts)
    return aucs


def _percentiles(values: np.ndarray, level: float) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    return [float(v) for v in np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])]


def _row_means(aucs: np.ndarray) -> np.ndarray:
    """Each resample's mean over its defined labels (NaN where none is defined)."""
    defined = ~np.isnan(aucs)
    sums = np.where(defined, aucs, 0.0).sum(axis=1)
    counts = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def bootstrap_auroc_ci(y_true, y_prob, labels=None, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                       chunk: int | None = None) -> tuple[dict[str, list[float] | None], list[float] | None]:
    """Percentile bootstrap CI of each label's AUROC and of the mean AUROC.

    Images are resampled with replacement (the same resample for all labels, so the mean's interval
    reflects their correlation); a resample where a label has one class only is skipped for that
    label, and the mean of a resample is over its defined labels. Returns ({label: [lo, hi] or
    None}, [lo, hi] or None). Deterministic for a given seed.
    """
    t, p, labels = _as_arrays(y_true, y_prob, labels)
    if n_boot < 1 or t.shape[0] == 0:
        return {name: None for name in labels}, None
    aucs = _bootstrap_aurocs(t, p, n_boot, seed, chunk)
    per_label = {name: _percentiles(aucs[:, j], level) for j, name in enumerate(labels)}
    return per_label, _percentiles(_row_means(aucs), level)


def paired_auroc_difference(y_true, prob_b, prob_a, labels=None, n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95) -> dict[str, Any]:
    """Model b's AUROC minus model a's on the same images, with a paired bootstrap interval.

    Both models' scores are resampled with the same images in every resample, so what the images
    alone explain (which positives happen to be easy) cancels, and the interval is much narrower
    than the two models' own intervals suggest. The mean is over the labels defined for the images.
    Returns {"mean": float | None, "ci": [lo, hi] | None, "labels": {label: {"mean", "ci"}}}: b is
    better when the whole interval lies above 0.
    """
    t, pb, labels = _as_arrays(y_true, prob_b, labels)
    _, pa, _ = _as_arrays(y_true, prob_a, labels)
    point = {name: (None if b is None or a is None else b - a) for name, b, a in
             zip(labels, per_label_auroc(t, pb, labels).values(), per_label_auroc(t, pa, labels).values())}
    out: dict[str, Any] = {"mean": _mean(point.values()), "ci": None,
                           "labels": {name: {"mean": v, "ci": None} for name, v in point.items()}}
    if n_boot < 1 or t.shape[0] == 0:
        return out
    diff = _bootstrap_aurocs(t, pb, n_boot, seed) - _bootstrap_aurocs(t, pa, n_boot, seed)
    for j, name in enumerate(labels):
        out["labels"][name]["ci"] = _percentiles(diff[:, j], level)
    out["ci"] = _percentiles(_row_means(diff), level)
    return out


def tune_thresholds(y_true, y_prob, labels=None, method: str = "youden", default: float = 0.5) -> dict[str, float]:
    """Per-label decision thresholds tuned on (dev) data.

    method "youden": maximise sensitivity + specificity - 1 (Youden's J) on the ROC curve;
    "f1": maximise F1. A label with one class only keeps `default`.
    """
    if method not in ("youden", "f1"):
        raise ValueError(f"method={method!r}: expected 'youden' or 'f1'")
    t, p, labels = _as_arrays(y_true, y_prob, labels)
    out = {}
    for name, (y, s) in zip(labels, _columns(t, p)):
        if not 0 < y.sum() < y.size:
            out[name] = float(default)
            continue
        if method == "youden":
            fpr, tpr, thr = roc_curve(y, s)
            finite = np.isfinite(thr)  # roc_curve's first threshold is +inf (nothing positive)
            j = np.argmax((tpr - fpr)[finite])
            out[name] = float(thr[finite][j])
        else:
            # predicting "positive" for scores >= each distinct score, highest first: cumulative counts
            order = np.argsort(-s, kind="mergesort")
            s_sorted, y_sorted = s[order], y[order]
            last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # last index of each distinct score
            tp = np.cumsum(y_sorted == 1)[last]
            fp = np.cumsum(y_sorted == 0)[last]
            fn = (y == 1).sum() - tp
            f1 = 2 * tp / (2 * tp + fp + fn)
            out[name] = float(s_sorted[last][np.argmax(f1)])
    return out


def threshold_metrics(y_true, y_prob, labels=None, thresholds: float | dict = 0.5) -> dict[str, dict[str, float | None]]:
    """{"sensitivity", "specificity", "f1"}: each label -> value (None when undefined) at the thresholds."""
    t, p, labels = _as_arrays(y_true, y_prob, labels)
    sens, spec, f1 = {}, {}, {}
    for name, (y, s) in zip(labels, _columns(t, p)):
        thr = thresholds[name] if isinstance(thresholds, dict) else thresholds
        pred = s >= thr
        tp = int(np.sum(pred & (y == 1)))
        fp = int(np.sum(pred & (y == 0)))
        fn = int(np.sum(~pred & (y == 1)))
        tn = int(np.sum(~pred & (y == 0)))
        sens[name] = tp / (tp + fn) if tp + fn else None
        spec[name] = tn / (tn + fp) if tn + fp else None
        f1[name] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    return {"sensitivity": sens, "specificity": spec, "f1": f1}


def evaluate_predictions(y_true, y_prob, labels=None, thresholds: dict | None = None, n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """All metrics as one JSON-able dict (label-keyed dicts plus means over defined labels).

    thresholds: per-label decision thresholds tuned on dev (e.g. a run's thresholds.json) for
    sensitivity / specificity / F1; None uses 0.5. Accuracy is always at 0.5 (the study's metric).
    """
    t, p, labels = _as_arrays(y_true, y_prob, labels)
    if thresholds is None:
        thresholds = {name: 0.5 for name in labels}
    missing = [name for name in labels if name not in thresholds]
    if missing:
        raise ValueError(f"thresholds has no value for {missing[:5]} ({len(missing)} labels)")
    thresholds = {name: float(thresholds[name]) for name in labels}
    labelled = ~np.isnan(t)
    auroc = per_label_auroc(t, p, labels)
    auroc_ci, mean_auroc_ci = bootstrap_auroc_ci(t, p, labels, n_boot=n_boot, seed=seed)
    auprc = per_label_auprc(t, p, labels)
    accuracy = per_label_accuracy(t, p, labels, 0.5)
    baseline = baseline_all_absent_accuracy(t, labels)
    at_thr = threshold_metrics(t, p, labels, thresholds)
    return {
        "n_images": int(t.shape[0]),
        "labels": labels,
        "n_labelled": {name: int(labelled[:, j].sum()) for j, name in enumerate(labels)},
        "n_positive": {name: int(np.nansum(t[:, j])) for j, name in enumerate(labels)},
        "auroc": auroc,
        "auroc_ci": auroc_ci,
        "mean_auroc": _mean(auroc.values()),
        "mean_auroc_ci": mean_auroc_ci,
        "auprc": auprc,
        "mean_auprc": _mean(auprc.values()),
        "accuracy": accuracy,
        "mean_accuracy": _mean(accuracy.values()),
        "thresholds": thresholds,
        **at_thr,
        "mean_sensitivity": _mean(at_thr["sensitivity"].values()),
        "mean_specificity": _mean(at_thr["specificity"].values()),
        "mean_f1": _mean(at_thr["f1"].values()),
        "baseline_all_absent_accuracy": baseline,
        "mean_baseline_all_absent_accuracy": _mean(baseline.values()),
        "n_boot": int(n_boot),
        "seed": int(seed),
    }


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "" if not ci else f" ({ci[0]:.3f}-{ci[1]:.3f})"


def format_table(result: dict) -> str:
    """A markdown table of an `evaluate_predictions` result: one row per label and a mean row."""
    header = ("| Label | Positives / labelled | AUROC (95% CI) | AUPRC | Accuracy@0.5 | All-absent accuracy "
              "| Threshold | Sensitivity | Specificity | F1 |")
    rows = [header, "|" + "---|" * 10]
    n_lab = result.get("n_labelled", {})
    for name in result["labels"]:
        rows.append(
            f"| {name} | {result['n_positive'][name]} / {n_lab.get(name, result['n_images'])} "
            f"| {_fmt(result['auroc'][name])}{_fmt_ci(result['auroc_ci'][name])} | {_fmt(result['auprc'][name])} "
            f"| {_fmt(result['accuracy'][name])} | {_fmt(result['baseline_all_absent_accuracy'][name])} "
            f"| {_fmt(result['thresholds'][name])} | {_fmt(result['sensitivity'][name])} "
            f"| {_fmt(result['specificity'][name])} | {_fmt(result['f1'][name])} |"
        )
    rows.append(
        f"| **Mean** | {result['n_images']} images "
        f"| {_fmt(result['mean_auroc'])}{_fmt_ci(result['mean_auroc_ci'])} | {_fmt(result['mean_auprc'])} "
        f"| {_fmt(result['mean_accuracy'])} | {_fmt(result['mean_baseline_all_absent_accuracy'])} | "
        f"| {_fmt(result.get('mean_sensitivity'))} | {_fmt(result.get('mean_specificity'))} "
        f"| {_fmt(result.get('mean_f1'))} |"
    )
    return "\n".join(rows)


def plot_roc(y_true, y_prob, labels=None, title: str | None = None):
    """ROC curves, one per label with its AUROC in the legend, and the chance diagonal.

    Returns a matplotlib Figure (not pyplot state: safe in scripts, notebooks and Streamlit).
    """
    from matplotlib.figure import Figure

    t, p, labels = _as_arrays(y_true, y_prob, labels)
    auroc = per_label_auroc(t, p, labels)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot(1, 1, 1)
    for name, (y, s) in zip(labels, _columns(t, p)):
        if auroc[name] is None:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, linewidth=1.3, label=f"{name} ({auroc[name]:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (0.500)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title or "ROC curves")
    ax.legend(loc="lower right", fontsize="small", title="AUROC")
    fig.tight_layout()
    return fig
