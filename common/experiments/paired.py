"""Runs compared on the same held-out images: paired AUROC differences with bootstrap intervals.

Two runs' test AUROCs, each with its own interval, overlap on a few hundred images even when one
run is better on nearly every resample. Scoring both on the same images and resampling the images
once for both (`common.metrics.paired_auroc_difference`) answers "is b better than a?" with an
interval of the difference itself. The images are those every compared run held out as test, less
the patients any of them (or a run it started from, e.g. stage 1 before stage 2) trained or chose
its checkpoint on.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common import runs as runfiles
from common.experiments.heldout import held_out
from common.experiments.runcache import RunRef
from common.experiments.tables import Table
from common.metrics import paired_auroc_difference
from common.splits import IMAGE, PATIENT, SPLIT, run_split


def seen_patients(run_dir: str | Path) -> set[str]:
    """Patients a run trained or chose its checkpoint on, and those of the trained runs it started
    from (`init_from`, followed back); a self-supervised run saw no labels and adds none."""
    seen: set[str] = set()
    todo, done = [Path(run_dir)], set()
    while todo:
        run = todo.pop()
        if run in done or not (run / "config.json").is_file():
            continue
        done.add(run)
        train = runfiles.read_config(run).get("train")
        if not train:
            continue
        frame = run_split(run)
        seen |= set(frame.loc[frame[SPLIT] != "test", PATIENT].astype(str))
        if train.get("init_from"):
            todo.append(Path(train["init_from"]))
    return seen


def shared_test_images(runs: Sequence[RunRef]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """(labels, y_true [N, L], one [N, L] probability array per run) on the images every run held
    out as test whose patients none of them saw (`seen_patients`); labels are the first run's."""
    outs = [held_out(r.run_dir) for r in runs]
    labels = outs[0].labels
    seen = set().union(*(seen_patients(r.run_dir) for r in runs))
    keep = None
    for o in outs:
        ok = set(o.frame.loc[~o.frame[PATIENT].astype(str).isin(seen), IMAGE].astype(str))
        keep = ok if keep is None else keep & ok
    order = sorted(keep or ())
    probs, y = [], None
    for o in outs:
        if o.labels != labels:
            raise ValueError(f"runs with different labels cannot be compared: {labels} vs {o.labels}")
        index = pd.Series(np.arange(len(o.frame)), index=o.frame[IMAGE].astype(str))
        rows = index[~index.index.duplicated()].reindex(order).to_numpy()
        probs.append(o.y_prob[rows])
        y = o.y_true[rows] if y is None else y
    return labels, (y if y is not None else np.zeros((0, len(labels)))), probs


def verdict(ci: Sequence[float] | None, better: str = "better", worse: str = "worse") -> str:
    """What an interval of a difference says: better / worse when it excludes 0, else cannot tell."""
    if not ci:
        return "n/a"
    if ci[0] > 0:
        return better
    if ci[1] < 0:
        return worse
    return "cannot tell (the interval holds 0)"


def format_difference(d: Mapping) -> str:
    """"+0.012 [-0.010, +0.034]" for {"mean", "ci"}; "n/a" without a mean."""
    if d.get("mean") is None:
        return "n/a"
    ci = d.get("ci")
    return f"{d['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def paired_table(ttl: str, base: tuple[str, RunRef], others: Sequence[tuple[str, RunRef]], n_boot: int,
                 label: str = "Cardiomegaly", note: str = "") -> tuple[Table, dict]:
    """One row per other run: its test mean AUROC (and `label`'s) minus the base run's, on the same
    images, with paired bootstrap 95% intervals and what they say. Also returns {row: difference}."""
    base_name, base_run = base
    labels, y, probs = shared_test_images([base_run, *(r for _, r in others)])
    rows, head = [], {}
    for (name, _), p in zip(others, probs[1:]):
        d = paired_auroc_difference(y, p, probs[0], labels, n_boot=n_boot, seed=0)
        one = d["labels"].get(label, {})
        rows.append({"Compared": f"{name} minus {base_name}", "Same test images": str(len(y)),
                     "Mean AUROC difference [95% CI]": format_difference(d), "Says": verdict(d["ci"]),
                     f"{label} AUROC difference [95% CI]": format_difference(one) if one else "n/a",
                     f"{label}: says": verdict(one.get("ci")) if one else "n/a"})
        head[name] = {"mean": d["mean"], "ci": d["ci"], label: one.get("mean"), f"{label}_ci": one.get("ci")}
    text = ("Paired on the same held-out images (those every compared run held out as test, less the patients any "
            "of them, or the stage 1 it started from, trained or chose its checkpoint on); both runs are resampled "
            f"with the same images ({n_boot} bootstrap resamples), so the interval is the difference's own. "
            "'better' / 'worse': the whole interval lies above / below 0.")
    return Table(ttl, pd.DataFrame(rows), f"{text} {note}".strip()), head


__all__ = ["format_difference", "paired_table", "seen_patients", "shared_test_images", "verdict"]
