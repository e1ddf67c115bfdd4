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


def task_of(labels) -> str | None:
    """The task whose outputs are exactly `labels` (in order), or None."""
    return next((task for task, names in TASKS.items() if list(names) == list(labels)), None)


# Finding names as label files write them: any case, '_' or ' ' between words ("pleural thickening").
_BY_KEY = {" ".join(name.lower().replace("_", " ").split()): name for name in LABELS}
_NO_FINDING_KEY = NO_FINDING.lower()


def split_findings(text: str) -> tuple[list[str], list[str]]:
    """NIH's `Finding Labels` text ("A|B" or "No Finding") -> (known findings, unknown names).

    Known findings come in LABELS spelling, each once; names match whatever their case and
    whether words are joined by '_' or ' '. Unknown names (`Covid`, findings of later releases or
    other hospitals) are returned as written, for the caller to report. Empty text and "No Finding"
    give ([], []).
    """
    known: list[str] = []
    unknown: list[str] = []
    for raw in (text or "").split("|"):
        name = raw.strip()
        key = " ".join(name.lower().replace("_", " ").split())
        if not key or key == _NO_FINDING_KEY:
            continue
        label = _BY_KEY.get(key)
        if label is None:
            unknown.append(name)
        elif label not in known:
            known.append(label)
    return known, unknown


def parse_findings(text: str) -> list[str]:
    """The known findings of a `Finding Labels` text (see `split_findings`).

    Raises ValueError for a name that is not one of the 14 findings.
    """
    known, unknown = split_findings(text)
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; expected some of {list(LABELS)} or {NO_FINDING!r}")
    return known
