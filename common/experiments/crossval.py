"""Patient-wise K-fold cross-validation: every image a test image once, scores with CIs across folds.

    cv = cross_validate(TrainConfig(data=[...], task="all14", model_name="resnet18", ...), folds=5)
    cv.summary()                 # per label: fold mean AUROC [95% t-interval], pooled out-of-fold AUROC
    paired_difference(cv_b, cv_a)   # mean AUROC of b minus a, fold by fold, with its interval

On a few hundred radiographs one test split of 20% holds a handful of positives per finding and
its AUROC swings by ±0.15 between seeds; K folds use every image once and give K paired estimates.
Each fold is an ordinary cached run (`runcache.cached_fit`: reused when finished, resumed when
interrupted), with `TrainConfig.folds` / `fold` choosing its test split (`common.data.patient_folds`,
the same stratified folds for every recipe of one seed, so recipes are compared on the same images).

Two summaries, because they answer different questions:
- across folds: the mean of the K per-fold AUROCs and its Student-t 95% interval (the spread of a
  recipe's result over training runs and test sets; what the issue tables report);
- pooled: one AUROC over all out-of-fold predictions with a bootstrap interval over images (more
  stable for rare findings, which have two or three positives per fold).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import runs as runfiles
from common.experiments.runcache import RunRef, cached_fit
from common.metrics import bootstrap_auroc_ci, paired_auroc_difference, per_label_auroc
from common.serving import PREDICTIONS_IMAGE_COLUMN
from common.splits import IMAGE, run_split

__all__ = ["CrossValidation", "cross_validate", "compare_inits", "paired_difference", "pooled_paired_difference",
           "t_interval"]


def t_interval(values, level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of `values` with a Student-t interval; NaNs ignored; (None,)*3 when empty."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return None, None, None
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


@dataclass
class CrossValidation:
    """The K fold runs of one recipe and what they predicted for their test folds."""

    name: str
    runs: list[RunRef]  # fold k's run at index k (only the folds that were run)
    folds: int

    @functools.cached_property
    def labels(self) -> list[str]:
        return list(runfiles.read_config(self.runs[0].run_dir)["labels"])

    def out_of_fold(self) -> pd.DataFrame:
        """Every test image of every fold run: image, fold, the true labels (`y_<label>`, 1 / 0 / NaN)
        and the predicted probabilities (`<label>`). Read once; a copy per call."""
        return self._out_of_fold.copy()

    @functools.cached_property
    def _out_of_fold(self) -> pd.DataFrame:
        parts = []
        for k, ref in enumerate(self.runs):
            pred = pd.read_csv(ref.run_dir / runfiles.TEST_PREDICTIONS)
            split = run_split(ref.run_dir)
            truth = split.loc[split["split"] == "test", [IMAGE, *self.labels]].set_index(IMAGE)
            truth.columns = [f"y_{c}" for c in truth.columns]
            part = pred.rename(columns={PREDICTIONS_IMAGE_COLUMN: IMAGE}).join(truth, on=IMAGE)
            part.insert(1, "fold", int(runfiles.read_config(ref.run_dir)["train"].get("fold", k)))
            parts.append(part)
        return pd.concat(parts, ignore_index=True)

    def fold_auroc(self) -> pd.DataFrame:
        """AUROC per fold (rows) and label (columns); NaN where a fold's test split lacks a class."""
        oof = self.out_of_fold()
        rows = {}
        for fold, part in oof.groupby("fold", sort=True):
            y = part[[f"y_{c}" for c in self.labels]].to_numpy(dtype=np.float64)
            auc = per_label_auroc(y, part[self.labels].to_numpy(dtype=np.float64), self.labels)
            rows[fold] = {k: (np.nan if v is None else v) for k, v in auc.items()}
        return pd.DataFrame.from_dict(rows, orient="index")[self.labels]

    def fold_mean_auroc(self, labels: list[str] | None = None) -> pd.Series:
        """Each fold's mean AUROC over `labels` (default: all of the run's labels) that it defines."""
        return self.fold_auroc()[labels or self.labels].mean(axis=1, skipna=True)

    def seconds(self) -> list[float]:
        """Each fold run's training wall-clock, seconds (metrics.json["run"]["train_seconds"])."""
        found = [ref.metrics()["run"].get("train_seconds") for ref in self.runs]
        return [float("nan") if s is None else float(s) for s in found]  # runs from before it was recorded: NaN

    def summary(self, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        """{"labels": {label: {"mean", "low", "high", "folds", "pooled", "pooled_low", "pooled_high"}},
        "mean_auroc": {"mean", "low", "high"} (of the fold means), "minutes_per_fold": ...}."""
        per_fold = self.fold_auroc()
        oof = self.out_of_fold()
        y = oof[[f"y_{c}" for c in self.labels]].to_numpy(dtype=np.float64)
        p = oof[self.labels].to_numpy(dtype=np.float64)
        pooled = per_label_auroc(y, p, self.labels)
        ci, _ = bootstrap_auroc_ci(y, p, self.labels, n_boot=n_boot, seed=seed)
        labels = {}
        for name in self.labels:
            mean, low, high = t_interval(per_fold[name])
            lo_hi = ci.get(name) or (None, None)
            labels[name] = {"mean": mean, "low": low, "high": high, "folds": int(per_fold[name].notna().sum()),
                            "pooled": pooled.get(name), "pooled_low": lo_hi[0], "pooled_high": lo_hi[1]}
        mean, low, high = t_interval(per_fold[self.labels].mean(axis=1, skipna=True))  # fold_mean_auroc
        secs = [s for s in self.seconds() if not math.isnan(s)]
        return {"name": self.name, "folds": len(self.runs), "of_folds": self.folds, "labels": labels,
                "mean_auroc": {"mean": mean, "low": low, "high": high},
                "seconds_per_fold": float(np.mean(secs)) if secs else None,
                "minutes_per_fold": round(float(np.mean(secs)) / 60, 2) if secs else None}


def cross_validate(config, folds: int = 5, name: str = "", runs: str | Path | None = None,
                   only: list[int] | None = None, stage1: bool = False) -> CrossValidation:
    """Train `config` once per fold (`folds` >= 2; `only`: a subset of fold numbers, for a quick look)
    and return the fold runs. Each is a cached run: reused when finished, resumed when interrupted.

    stage1: start each fold's run from a stage 1 (Cardiomegaly vs No Finding, the same settings and
    `config.init_from`) trained on that fold's own training patients: a patient is in the same fold
    for both tasks (`common.data.task_split`), so no stage 1 has seen its stage 2's test images."""
    chosen = list(range(folds)) if only is None else sorted(set(only))
    label = name or config.model_name
    refs = []
    for k in chosen:
        cfg = dataclasses.replace(config, folds=folds, fold=k)
        if stage1:
            first = cached_fit(dataclasses.replace(cfg, task="cardiomegaly"), f"{label}: stage 1, fold {k + 1}/{folds}",
                               config.model_name, runs)
            cfg = dataclasses.replace(cfg, init_from=str(first.run_dir))
        refs.append(cached_fit(cfg, f"{label}: fold {k + 1}/{folds}", config.model_name, runs))
    return CrossValidation(label, refs, folds)


def compare_inits(config, pretrained_run: str | Path | None, folds: int = 5, runs: str | Path | None = None,
                  only: list[int] | None = None) -> pd.DataFrame:
    """The study's question "what should stage 2 start from?" on the same folds: random
    initialisation, a self-supervised backbone (`pretrained_run`, from `medimaging pretrain`; None
    skips it), a per-fold stage 1, and stage 1 started from the self-supervised backbone. One row
    each: mean AUROC and Cardiomegaly AUROC across folds [95% t-interval], and the paired difference
    of the mean AUROC from random initialisation."""
    plain = dataclasses.replace(config, init_from=None)
    variants = [("random init", plain, False), ("stage 1", plain, True)]
    if pretrained_run is not None:
        ssl = dataclasses.replace(config, init_from=str(pretrained_run))
        variants[1:1] = [("self-supervised", ssl, False)]
        variants.append(("self-supervised + stage 1", ssl, True))
    results = [(name, cross_validate(cfg, folds, name, runs, only, stage1=s1)) for name, cfg, s1 in variants]
    base = results[0][1]
    rows = []
    for name, cv in results:
        summary = cv.summary(n_boot=0)
        diff = paired_difference(cv, base) if cv is not base else (None, None, None)
        pooled = pooled_paired_difference(cv, base) if cv is not base else {"mean": None, "ci": None}
        rows.append({"start": name, "folds": len(cv.runs), "mean AUROC": summary["mean_auroc"],
                     "Cardiomegaly AUROC": {k: summary["labels"].get("Cardiomegaly", {}).get(k)
                                            for k in ("mean", "low", "high")},
                     "vs random init": dict(zip(("mean", "low", "high"), diff)),
                     "pooled vs random init": {"mean": pooled["mean"], "low": (pooled["ci"] or (None, None))[0],
                                               "high": (pooled["ci"] or (None, None))[1]},
                     "min / fold": summary["minutes_per_fold"]})
    return pd.DataFrame(rows)


def pooled_paired_difference(b: CrossValidation, a: CrossValidation, n_boot: int = 1000, seed: int = 0) -> dict:
    """b minus a on every out-of-fold image both predicted, one paired bootstrap over the images
    (`common.metrics.paired_auroc_difference`): with K folds pooled, every image counts once, so the
    interval is far narrower than K fold differences give. {"mean", "ci", "labels"}."""
    oa, ob = a.out_of_fold(), b.out_of_fold()
    both = oa.merge(ob[[IMAGE, *b.labels]], on=IMAGE, suffixes=("", "_b"))
    y = both[[f"y_{c}" for c in a.labels]].to_numpy(dtype=np.float64)
    pa = both[a.labels].to_numpy(dtype=np.float64)
    pb = both[[f"{c}_b" for c in a.labels]].to_numpy(dtype=np.float64)
    return paired_auroc_difference(y, pb, pa, a.labels, n_boot=n_boot, seed=seed)


def paired_difference(b: CrossValidation, a: CrossValidation, labels: list[str] | None = None
                      ) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): fold by fold, b's mean AUROC minus a's, with a Student-t 95% interval.

    Both must be cross-validations over the same folds (same data, seed and K): each fold's two runs
    were tested on the same images, so the difference cancels what the images alone explain."""
    da, db = a.fold_mean_auroc(labels), b.fold_mean_auroc(labels)
    common_folds = da.index.intersection(db.index)
    return t_interval((db[common_folds] - da[common_folds]).to_numpy())

