"""Plots of runs: training curves, test ROC, per-label AUROC beside CheXNet, example predictions.

matplotlib `Figure`s (no pyplot state), which `Experiment.figure` saves and shows.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.cache import ImageCache
from common.experiments.heldout import held_out
from common.experiments.runcache import RunRef
from common.labels import CHEXNET_AUROC, LABELS
from common.metrics import plot_roc


def figure(w: float, h: float) -> Figure:
    """A matplotlib Figure of w x h inches, outside pyplot (no global state, nothing shown twice)."""
    return Figure(figsize=(w, h))


def plot_curves(runs_: Mapping[str, RunRef], ttl: str):
    """Training curves of several runs: train / dev loss and dev mean AUROC per epoch."""
    fig = figure(12, 4)
    axes = [fig.add_subplot(1, 2, i) for i in (1, 2)]
    seen = set()
    for i, (role, run) in enumerate(runs_.items()):
        if run.run_dir in seen:  # two roles of one run (e.g. backbones a profile trains alike)
            continue
        seen.add(run.run_dir)
        h = run.history()
        if h.empty:
            continue
        color = f"C{i % 10}"
        axes[0].plot(h["epoch"], h["train_loss"], "-o", color=color, label=f"{role}: train")
        axes[0].plot(h["epoch"], h["dev_loss"], "--s", color=color, label=f"{role}: dev")
        axes[1].plot(h["epoch"], h["dev_mean_auroc"], "-o", color=color, label=role)
    axes[0].set_title("loss (masked BCE)")
    axes[1].set_title("dev mean AUROC")
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="x-small")
    fig.suptitle(ttl)
    fig.tight_layout()
    return fig


def plot_test_roc(run: RunRef, ttl: str):
    """ROC curves per label of a run's test split (common.metrics.plot_roc)."""
    ts = held_out(run.run_dir)
    return plot_roc(ts.y_true, ts.y_prob, ts.labels, title=ttl)


def plot_chexnet_comparison(metrics: Mapping, ttl: str):
    """Per-label test AUROC (with 95% intervals) beside CheXNet's published values."""
    fig = figure(11, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(LABELS))
    ours = [metrics["auroc"].get(n) for n in LABELS]
    ci = [metrics["auroc_ci"].get(n) for n in LABELS]
    vals = np.array([v if v is not None else np.nan for v in ours])
    err = np.array([[v - c[0], c[1] - v] if (v is not None and c) else [0, 0] for v, c in zip(ours, ci)]).T
    ax.bar(x - 0.2, vals, 0.4, yerr=err, capsize=2, label="ours (test, 95% CI)", color="tab:blue")
    ax.bar(x + 0.2, [CHEXNET_AUROC[n] for n in LABELS], 0.4, label="CheXNet (published)", color="tab:gray")
    ax.axhline(0.5, color="red", linestyle=":", linewidth=1, label="chance (0.5)")
    ax.set_xticks(x, LABELS, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC")
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(ttl)
    fig.tight_layout()
    return fig


def prediction_grid(run: RunRef, ttl: str, n: int = 8, size: int = 128, seed: int = 0):
    """A few test images with their true findings and the run's highest probabilities."""
    ts = held_out(run.run_dir)
    if not len(ts.frame):
        return figure(2, 2)
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(np.nansum(ts.y_true, axis=1) > 0)
    neg = np.flatnonzero(np.nansum(ts.y_true, axis=1) == 0)
    pick = list(rng.choice(pos, min(len(pos), n // 2), replace=False)) if len(pos) else []
    pick += list(rng.choice(neg, min(len(neg), n - len(pick)), replace=False)) if len(neg) else []
    paths = [ts.frame["path"].iat[i] for i in pick]
    cached = ImageCache(size).load(paths, progress=False)
    cols = min(4, len(pick)) or 1
    nrows = math.ceil(len(pick) / cols) or 1
    fig = figure(3.4 * cols, 4.0 * nrows)
    for k, i in enumerate(pick):
        ax = fig.add_subplot(nrows, cols, k + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if cached.ok[k]:
            ax.imshow(cached.images[k], cmap="gray", vmin=0, vmax=255)
        truth = [lab for j, lab in enumerate(ts.labels) if ts.y_true[i, j] == 1] or ["none of these"]
        top = np.argsort(-ts.y_prob[i])[:3]
        pred = ", ".join(f"{ts.labels[j]} {ts.y_prob[i, j]:.2f}" for j in top)
        ax.set_title(f"true: {', '.join(truth)}\npredicted: {pred}", fontsize=7)
    fig.suptitle(ttl)
    fig.tight_layout()
    return fig


