"""The reproduce order: every experiment notebook, in the order `medimaging reproduce` runs them,
and where their results go.

Light on purpose (no imports): the command line builds `--only`'s choices and `--out`'s default
from it.
"""
from __future__ import annotations

from dataclasses import dataclass


# Where results go (OUT; its layout is common.experiments.records'). A user's own reproduction lands
# in results/local/, which git ignores, beside the committed results of the real NIH sample in
# results/ (results/README.md says how they were made), so `make reproduce` leaves the tree clean
# and the two compare side by side.
RESULTS_DIR = "results"
DEFAULT_OUT = "results/local"


@dataclass(frozen=True)
class Notebook:
    """One entry of the reproduce order."""

    name: str  # what `--only` takes; also the name of its tables file (OUT/tables/<name>.json)
    path: str  # relative to the repository root
    what: str  # one line for `--help` and the log


# The one ordered table of notebooks: each may reuse the cached runs of those above it (the
# multi-task notebook's stage 1 is the single-task run; the freezing ablation starts from it).
# To add a notebook, add a line here before "results", which collects every table written above it.
NOTEBOOKS: tuple[Notebook, ...] = (
    Notebook("data_exploration", "notebooks/data_exploration.ipynb", "label frequencies, co-occurrence, demographics, images"),
    Notebook("single_task", "single-task/single_task.ipynb", "stage 1: Cardiomegaly vs No Finding"),
    Notebook("multi_task", "multi-task/multi_task.ipynb", "stage 2: 14 labels from stage 1, and without it"),
    Notebook("transformer", "transformer/transformer.ipynb", "the two stages with a ViT"),
    Notebook("backbone_ablation", "notebooks/backbone_ablation.ipynb", "VGG, ResNet, DenseNet, CSPDarkNet, EfficientNet, ViT, ConvNeXt"),
    Notebook("freeze_ablation", "notebooks/freeze_ablation.ipynb", "nothing / early stages / all but the head frozen"),
    Notebook("compression", "notebooks/compression.ipynb", "int8 / pruning / distillation: size, speed and AUROC in one table"),
    Notebook("localisation", "notebooks/localisation.ipynb", "Grad-CAM pointing game of the stage-2 run on the data's radiologist boxes"),
    Notebook("results", "notebooks/results.ipynb", "every table, ROC curves, training curves, CheXNet comparison"),
)


def notebook_names() -> list[str]:
    return [nb.name for nb in NOTEBOOKS]
