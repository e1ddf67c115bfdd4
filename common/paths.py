"""Where things are: the repository root, the one rule that finds a data folder, the sample data.

A leaf module (no project imports), so anything may import it, the light serving path included.

The rule for a data folder given by name (`dataset_full`, `dataset_cardiomegaly`) or relative
path: the first of the working directory, its parents and the repository root that has it. The
trainer files usually run from the repository root, the notebooks from their own folder (its
parent has the data), a `medimaging` command from anywhere (the installed checkout has it).
"""
from __future__ import annotations

import os
from pathlib import Path

# common/ is installed editable from the checkout, so its parent is the repository.
REPO_ROOT = Path(__file__).resolve().parents[1]

# The folders where users put data (see their README.md files).
DATASET_FULL = "dataset_full"
DATASET_CARDIOMEGALY = "dataset_cardiomegaly"

# In every dataset folder the suite generates (common.synthetic); written last, so it also says "complete".
SYNTHETIC_MARKER = "SYNTHETIC.json"

# The real NIH sample data for tests and benchmarks: this variable, else ../shared/data beside the checkout.
SAMPLE_DATA_ENV = "MEDIMAGING_SAMPLE_DATA"


def find_data_dir(name: str | os.PathLike) -> Path:
    """A data folder, absolute: `name` as given when absolute, else below the first of the working
    directory, its parents and the repository root that has it; else below the working directory
    (a folder that does not exist, which the caller reports or treats as empty)."""
    p = Path(name).expanduser()
    if p.is_absolute():
        return p.resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, REPO_ROOT):
        if (folder / p).is_dir():
            return (folder / p).resolve()
    return (here / p).resolve()


def has_data(folder: str | os.PathLike) -> bool:
    """A folder with something in it besides hidden files and its README."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(not e.name.startswith(".") and not e.name.lower().startswith("readme") for e in os.scandir(folder))


def sample_data_dir() -> Path:
    """Root of the real NIH sample data (`nih-sample/`, `nih-64-cardiomegaly/`); it may not exist."""
    env = os.environ.get(SAMPLE_DATA_ENV)
    return Path(env).resolve() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def cache_root() -> Path:
    """The cache folder: $MEDIMAGING_CACHE, else ~/.cache/medimaging."""
    env = os.environ.get("MEDIMAGING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medimaging"
