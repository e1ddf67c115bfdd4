"""The 14 NIH ChestX-ray14 findings, in the one fixed order every part of the suite uses."""
from __future__ import annotations

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_LABELS = len(LABELS)
NO_FINDING = "No Finding"

# CheXNet (Rajpurkar et al. 2017, DenseNet-121) per-label test AUROC, for the results chart.
CHEXNET_AUROC: dict[str, float] = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}
CHEXNET_MEAN_AUROC = 0.841

# Tasks: which outputs a model has. "cardiomegaly" is stage 1 of the study, "all14" stage 2.
TASKS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "all14": LABELS,
}


def parse_findings(text: str) -> list[str]:
    """Split NIH's `Finding Labels` text ("A|B" or "No Finding") into finding names.

    Raises ValueError for a name that is not one of the 14 findings.
    """
    text = (text or "").strip()
    if not text or text == NO_FINDING:
        return []
    names = [t.strip() for t in text.split("|") if t.strip()]
    unknown = [n for n in names if n not in LABELS and n != NO_FINDING]
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; expected some of {list(LABELS)} or {NO_FINDING!r}")
    return [n for n in names if n != NO_FINDING]
