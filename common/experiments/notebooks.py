"""The reproduce order (every experiment notebook, in the order `medimaging reproduce` runs them)
and the names the experiments give what they write: OUT's layout, the run cache's folder, the
folders of compressed runs and the roles of the study's runs in the records.

Light on purpose (only common.paths): the command line builds `--only`'s choices and `--out`'s
default from it, and the app's catalog names runs with it, without loading pandas or the cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.paths import cache_root

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
    Notebook("init_comparison", "notebooks/init_comparison.ipynb", "stage 2 from random, self-supervised, stage 1, both"),
    Notebook("transformer", "transformer/transformer.ipynb", "the two stages with a ViT"),
    Notebook("backbone_ablation", "notebooks/backbone_ablation.ipynb", "VGG, ResNet, DenseNet, CSPDarkNet, EfficientNet, ViT, ConvNeXt"),
    Notebook("freeze_ablation", "notebooks/freeze_ablation.ipynb", "nothing / early stages / all but the head frozen"),
    Notebook("compression", "notebooks/compression.ipynb", "int8 / pruning / distillation: size, speed and AUROC in one table"),
    Notebook("localisation", "notebooks/localisation.ipynb", "Grad-CAM pointing game of the stage-2 run on the data's radiologist boxes"),
    Notebook("results", "notebooks/results.ipynb", "every table, ROC curves, training curves, CheXNet comparison"),
)


def notebook_names() -> list[str]:
    return [nb.name for nb in NOTEBOOKS]


def in_reproduce_order(names) -> list[str]:
    """Notebook names in reproduce order, then any others as given."""
    known = notebook_names()
    return [n for n in known if n in names] + [n for n in names if n not in known]


# OUT's layout (common.experiments.records writes it)
TABLES_DIR = "tables"  # OUT/tables/<name>.json: one record per notebook
FIGURES_DIR = "figures"  # OUT/figures/<name>_<figure>.png
NOTEBOOKS_DIR = "notebooks"  # OUT/notebooks/<name>.ipynb: each notebook as executed
TABLES_MD = "tables.md"  # OUT/tables.md: every table, collected

# The roles of the study's two stages in the experiment records (RunRef.role): the app's catalog
# (common.catalog) tells them from ablation rows and compressed variants by these names.
STAGE1 = "stage 1"  # Cardiomegaly vs No Finding
STAGE2 = "stage 2"  # 14 labels, started from stage 1
WITHOUT_STAGE1 = "stage 2 without stage 1"  # 14 labels from the profile's initialisation

# A compressed variant's folder in the run cache: RUNS/<source run>--<method>-<key>
COMPRESSED_SEP = "--"


def is_compressed(run_dir: str | Path) -> bool:
    return COMPRESSED_SEP in Path(run_dir).name


def runs_dir(path: str | Path | None = None) -> Path:
    """The run cache: `path`, else $MEDIMAGING_RUNS, else <common.cache.cache_root()>/runs."""
    if path is not None:
        return Path(path).expanduser().resolve()
    if os.environ.get("MEDIMAGING_RUNS"):
        return Path(os.environ["MEDIMAGING_RUNS"]).expanduser().resolve()
    return (cache_root() / "runs").resolve()
