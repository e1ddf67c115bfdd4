"""Data exploration: the datasets, label frequencies, co-occurrence, demographics and example images."""
from __future__ import annotations

import numpy as np
import pandas as pd

from common.cache import ImageCache
from common.experiments.datasets import DataSpec, display_path, resolve_data, title
from common.experiments.plots import figure
from common.experiments.profiles import get_profile
from common.experiments.records import Experiment
from common.experiments.tables import Table, num, pct
from common.labels import LABELS, NO_FINDING


def label_counts(data: DataSpec) -> Table:
    """Positives and prevalence per label, per dataset and combined, with No Finding."""
    rows = []
    sets = data.datasets()
    for name in [*LABELS, NO_FINDING]:
        row = {"Finding": name}
        for ds in sets:
            f = ds.frame
            if name == NO_FINDING:
                y = f[list(LABELS)]
                pos = int(((y == 0).all(axis=1)).sum())
                known = int(y.notna().all(axis=1).sum())
            else:
                pos, known = int((f[name] == 1).sum()), int(f[name].notna().sum())
            row[f"{ds.name}: positives / labelled"] = f"{pos} / {known}"
            row[f"{ds.name}: prevalence (%)"] = pct(pos / known) if known else "n/a"
        rows.append(row)
    note = ("A Cardiomegaly-only set labels nothing else (NaN, masked in training). The trivial 'absent' "
            "accuracy of a label is 100 minus its prevalence.")
    return Table(title("Label frequencies", data.synthetic), pd.DataFrame(rows), note)


def dataset_overview(data: DataSpec) -> Table:
    rows = []
    for ds in data.datasets():
        f = ds.frame
        rows.append({"Dataset": ds.name, "Folder": display_path(ds.root), "Layout": ds.layout, "Images": len(f),
                     "Patients": int(f["patient_id"].nunique()), "Rows without an image": ds.rows_without_image,
                     "Official split": ", ".join(f"{k} {v}" for k, v in f["official_split"].value_counts().items()) or "none"})
    return Table(title("Datasets", data.synthetic), pd.DataFrame(rows))


def cooccurrence(data: DataSpec) -> pd.DataFrame:
    """Label co-occurrence counts (14 x 14) over images labelled for all 14 findings."""
    f = data.frame()
    y = f[list(LABELS)]
    y = y[y.notna().all(axis=1)].to_numpy(dtype=np.int64)
    return pd.DataFrame(y.T @ y, index=list(LABELS), columns=list(LABELS))


def demographics(data: DataSpec) -> list[Table]:
    """Age summary, sex and view counts (where the sources record them)."""
    f = data.frame()
    tables = []
    age = f.groupby("source")["age"].describe()[["count", "mean", "25%", "50%", "75%", "min", "max"]]
    age = age.reset_index().rename(columns={"source": "Dataset", "count": "Images with an age"})
    age["Images with an age"] = age["Images with an age"].astype(int)
    for col in ("mean", "25%", "50%", "75%", "min", "max"):
        age[col] = [num(v, 1) for v in age[col]]
    tables.append(Table(title("Patient age (years)", data.synthetic), age,
                        "n/a: the source records no age (the Cardiomegaly layout has none)."))
    for col, name in (("sex", "Sex"), ("view", "View position")):
        counts = f[col].fillna("not recorded").groupby(f["source"]).value_counts().unstack(fill_value=0)
        counts = counts.reset_index().rename(columns={"source": "Dataset"})
        tables.append(Table(title(name, data.synthetic), counts))
    return tables


def plot_label_frequencies(data: DataSpec):
    f = data.frame()
    fig = figure(9, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    pos = [(f[n] == 1).sum() for n in LABELS]
    known = [max(1, f[n].notna().sum()) for n in LABELS]
    ax.bar(range(len(LABELS)), [100 * p / k for p, k in zip(pos, known)], color="tab:blue")
    for i, p in enumerate(pos):
        ax.text(i, 0.5, str(p), ha="center", va="bottom", fontsize=7, color="white")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("prevalence among labelled images (%)")
    ax.set_title(title("Label frequencies (bars: %, inside: positives)", data.synthetic))
    fig.tight_layout()
    return fig


def plot_cooccurrence(data: DataSpec):
    c = cooccurrence(data)
    fig = figure(8, 7)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(c.to_numpy(), cmap="viridis")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(LABELS)), LABELS, fontsize=8)
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(j, i, str(c.iat[i, j]), ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images with both findings")
    ax.set_title(title("Label co-occurrence (diagonal: positives)", data.synthetic))
    fig.tight_layout()
    return fig


def plot_demographics(data: DataSpec):
    f = data.frame()
    fig = figure(12, 3.8)
    ax = fig.add_subplot(1, 3, 1)
    ages = f["age"].dropna()
    if len(ages):
        ax.hist(ages, bins=20, color="tab:blue")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("images")
    ax.set_title("Age" + ("" if len(ages) else " (not recorded)"))
    for i, (col, name) in enumerate((("sex", "Sex"), ("view", "View position")), start=2):
        ax = fig.add_subplot(1, 3, i)
        counts = f[col].fillna("not recorded").value_counts()
        ax.bar(counts.index.astype(str), counts.to_numpy(), color="tab:orange")
        ax.set_title(name)
    fig.suptitle(title("Demographics and views", data.synthetic))
    fig.tight_layout()
    return fig


def image_grid(data: DataSpec, per_finding: int = 4, size: int = 128, seed: int = 0):
    """A grid of example images: one row per finding (and No Finding), `per_finding` columns."""
    f = data.frame()
    rng = np.random.default_rng(seed)
    rows = []
    for name in [NO_FINDING, *LABELS]:
        if name == NO_FINDING:
            mask = (f[list(LABELS)] == 0).all(axis=1)
        else:
            mask = f[name] == 1
        idx = np.flatnonzero(mask.to_numpy())
        pick = rng.choice(idx, size=min(per_finding, len(idx)), replace=False) if len(idx) else []
        rows.append((name, [f["path"].iat[i] for i in pick]))
    paths = [p for _, ps in rows for p in ps]
    cached = ImageCache(size).load(paths, progress=False) if paths else None
    where = {p: i for i, p in enumerate(paths)}
    fig = figure(1.6 * per_finding + 1.6, 1.6 * len(rows))
    for r, (name, ps) in enumerate(rows):
        for c in range(per_finding):
            ax = fig.add_subplot(len(rows), per_finding, r * per_finding + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(ps) and cached is not None and cached.ok[where[ps[c]]]:
                ax.imshow(cached.images[where[ps[c]]], cmap="gray", vmin=0, vmax=255)
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title("Example images per finding", data.synthetic))
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def data_exploration(profile: str = "quick", smoke: bool = False, data_full=None, data_cardiomegaly=None) -> Experiment:
    """Tables of the data: datasets, label frequencies, demographics (plots: see plot_* / image_grid)."""
    data = resolve_data(data_full, data_cardiomegaly)
    exp = Experiment("data_exploration", "Data exploration", get_profile(profile, smoke).name, data)
    exp.tables.append(dataset_overview(data))
    exp.tables.append(label_counts(data))
    exp.tables.extend(demographics(data))
    return exp

