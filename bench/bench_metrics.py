"""Metrics benchmark: the vectorised bootstrap AUROC CI against a scikit-learn loop.

    .venv/bin/python bench/bench_metrics.py
    .venv/bin/python bench/bench_metrics.py --images 1000 4000 25596 --n-boot 1000

For each test-set size: 14 labels, ~10% positives, 20% of labels missing (NaN), 1000 resamples.
Columns: `bootstrap_auroc_ci` seconds (median of --repeats), all of `evaluate_predictions`, and the
naive loop (`roc_auc_score` per resample and label) timed on --naive-boot resamples and scaled to
n_boot. Target (issue 3): < 2 s for 1000 resamples x 14 labels on a few thousand images.
25,596 is the size of NIH's official test list.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from common.labels import LABELS
from common.metrics import bootstrap_auroc_ci, evaluate_predictions


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.1).astype(np.float64)
    p = np.clip(0.3 * y + 0.7 * rng.random(y.shape), 0, 1)
    y[rng.random(y.shape) < 0.2] = np.nan
    return y, p


def naive_seconds(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for j in range(y.shape[1]):
            yt, ps = y[idx, j], p[idx, j]
            keep = ~np.isnan(yt)
            if 0 < yt[keep].sum() < keep.sum():
                roc_auc_score(yt[keep], ps[keep])
    return time.perf_counter() - start


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 4000, 25596])
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--naive-boot", type=int, default=20, help="resamples timed for the naive loop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"{len(LABELS)} labels, {args.n_boot} resamples; median of {args.repeats}")
    print("| images | bootstrap CI (s) | evaluate_predictions (s) | naive sklearn loop (s, scaled) | speed-up | target < 2 s |")
    print("|---|---|---|---|---|---|")
    for n in args.images:
        y, p = synthetic(n)
        boot = timed(lambda: bootstrap_auroc_ci(y, p, LABELS, n_boot=args.n_boot), args.repeats)
        full = timed(lambda: evaluate_predictions(y, p, LABELS, n_boot=args.n_boot), 1)
        naive = naive_seconds(y, p, args.naive_boot) * args.n_boot / args.naive_boot
        target = "yes" if boot < 2 else ("no" if n <= 5000 else "n/a")
        print(f"| {n} | {boot:.2f} | {full:.2f} | {naive:.1f} | {naive / boot:.0f}x | {target} |")


if __name__ == "__main__":
    main()
