"""Tables as the notebooks show them and tables.md collects them, and their number formats."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from common.labels import CHEXNET_AUROC, CHEXNET_MEAN_AUROC, LABELS


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class Table:
    """A titled table; `markdown()` for tables.md, rendered as markdown in notebooks."""

    title: str
    frame: pd.DataFrame
    note: str = ""

    def markdown(self) -> str:
        cols = [str(c) for c in self.frame.columns]
        lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
        for row in self.frame.itertuples(index=False):
            lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return f"**{self.title}**\n\n{self.markdown()}\n\n{self.note}".rstrip()

    def to_dict(self) -> dict:
        return {"title": self.title, "markdown": self.markdown(), "note": self.note,
                "columns": [str(c) for c in self.frame.columns], "rows": self.frame.astype(str).values.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Table:
        return cls(d["title"], pd.DataFrame(d.get("rows", []), columns=d.get("columns")), d.get("note", ""))


def pct(value: float | None) -> str:
    """A 0-1 rate as a percentage with two decimals (the study's format), or n/a."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    """AUROC with its bootstrap 95% interval: 0.781 [0.702, 0.853]."""
    if value is None:
        return "n/a (one class only)"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def mean_prevalence(m: Mapping) -> float | None:
    """Mean over labels of the share of labelled images that are positive (a trivial AUPRC)."""
    vals = [m["n_positive"][n] / m["n_labelled"][n] for n in m["labels"] if m.get("n_labelled", {}).get(n)]
    return float(np.mean(vals)) if vals else None


def baseline_row(m: Mapping, name_col: str, extra: Mapping[str, str] | None = None) -> dict:
    """The trivial baselines of a metrics dict: "absent" everywhere (accuracy) and chance (AUROC 0.5)."""
    return {name_col: "Trivial: predict 'absent' for all (accuracy); chance (AUROC 0.5)",
            "Accuracy (%)": pct(m.get("mean_baseline_all_absent_accuracy")), "AUROC [95% CI]": "0.500",
            "AUPRC": num(mean_prevalence(m)) + " (prevalence)", **(extra or {})}


def model_row(m: Mapping, name_col: str, name: str, extra: Mapping[str, str] | None = None) -> dict:
    return {name_col: name, "Accuracy (%)": pct(m.get("mean_accuracy")),
            "AUROC [95% CI]": with_ci(m.get("mean_auroc"), m.get("mean_auroc_ci")), "AUPRC": num(m.get("mean_auprc")),
            **(extra or {})}


def per_label_table(m: Mapping, ttl: str, note: str = "", compare: Mapping[str, Mapping] | None = None) -> Table:
    """One row per label: positives, accuracy beside the all-absent baseline, AUROC with CI, AUPRC,
    tuned-threshold sensitivity/specificity/F1, CheXNet's published AUROC; `compare` adds AUROC
    columns of other runs."""
    rows = []
    for name in m["labels"]:
        row = {
            "Label": name, "Positives / labelled": f"{m['n_positive'][name]} / {m.get('n_labelled', {}).get(name, m['n_images'])}",
            "Accuracy (%)": pct(m["accuracy"][name]), "All-absent accuracy (%)": pct(m["baseline_all_absent_accuracy"][name]),
            "AUROC [95% CI]": with_ci(m["auroc"][name], m["auroc_ci"][name]), "AUPRC": num(m["auprc"][name]),
            "Sensitivity": num(m["sensitivity"][name]), "Specificity": num(m["specificity"][name]), "F1": num(m["f1"][name]),
        }
        for col, other in (compare or {}).items():
            row[col] = with_ci(other["auroc"].get(name), other["auroc_ci"].get(name)) if name in other["auroc"] else "n/a"
        row["CheXNet AUROC (published)"] = num(CHEXNET_AUROC.get(name), 4)
        rows.append(row)
    mean = {
        "Label": "Mean", "Positives / labelled": f"{m['n_images']} images", "Accuracy (%)": pct(m["mean_accuracy"]),
        "All-absent accuracy (%)": pct(m["mean_baseline_all_absent_accuracy"]),
        "AUROC [95% CI]": with_ci(m["mean_auroc"], m["mean_auroc_ci"]), "AUPRC": num(m["mean_auprc"]),
        "Sensitivity": num(m.get("mean_sensitivity")), "Specificity": num(m.get("mean_specificity")),
        "F1": num(m.get("mean_f1")),
    }
    for col, other in (compare or {}).items():
        mean[col] = with_ci(other.get("mean_auroc"), other.get("mean_auroc_ci"))
    mean["CheXNet AUROC (published)"] = num(CHEXNET_MEAN_AUROC, 3) if len(m["labels"]) == len(LABELS) else "n/a"
    rows.append(mean)
    base = ("Trivial baselines: 'All-absent accuracy' predicts every finding absent; chance AUROC is 0.500. "
            "Sensitivity / specificity / F1 at per-label thresholds tuned on the dev split.")
    return Table(ttl, pd.DataFrame(rows), f"{base} {note}".strip())

