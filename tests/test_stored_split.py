"""Every reader of a run's held-out images uses the split the run stored: after images are added to
the data folder, evaluation, compression, int8 calibration and localisation still see exactly the
images they saw right after training (issue 9's acceptance)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from common.compress.measure import split_images
from common.data import NIH_CSVS, combine, load_dataset, task_split
from common.experiments.heldout import held_out
from common.experiments.localisation import held_out_images
from common.export import calibration_paths
from common.splits import run_split
from common.train import TrainConfig, fit

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")  # a tiny run from random init


def _nih_copy(nih_sample: Path, where: Path) -> Path:
    """An NIH-layout folder of our own: the sample's label file, its images linked, not copied."""
    where.mkdir()
    (where / "images").symlink_to(nih_sample / "images", target_is_directory=True)
    shutil.copy(nih_sample / NIH_CSVS[0], where)
    return where


def _add_patients(data: Path, donors: Path, n: int = 40) -> None:
    """n new patients (copies of other images under new names) appended to the label file."""
    table = pd.read_csv(data / NIH_CSVS[0])
    (data / "added").mkdir()
    rows = []
    for i, src in enumerate(sorted(donors.iterdir())[:n]):
        row = table.iloc[0].copy()
        row["Image Index"], row["Patient ID"] = f"{91000000 + i:08d}_000.png", 91000000 + i
        row["Finding Labels"] = "No Finding"
        shutil.copy(src, data / "added" / row["Image Index"])
        rows.append(row)
    pd.concat([table, pd.DataFrame(rows)]).to_csv(data / NIH_CSVS[0], index=False)


def _seen(run: Path) -> dict:
    """What each consumer takes as the run's held-out images."""
    return {
        "evaluation": held_out(run).frame["path"].astype(str).tolist(),
        "compression": split_images(run, "test").paths,
        "calibration": sorted(calibration_paths(run, n=10_000)),
        "localisation": sorted(held_out_images(run)),
    }


def test_readers_of_a_run_split_ignore_images_added_after_training(tmp_path, nih_sample, cardiomegaly_64):
    data = _nih_copy(nih_sample, tmp_path / "nih")
    run = tmp_path / "run"
    fit(TrainConfig(data=[str(data)], task="all14", model_name="test_efficientnet", image_size=32,
                    batch_size=16, epochs=1, max_steps=1, num_workers=0, n_boot=10, progress=False, seed=5,
                    out=str(run)))
    before = _seen(run)
    stored = run_split(run)
    assert len(stored) == 400
    assert before["evaluation"] == before["compression"] and before["localisation"]

    _add_patients(data, cardiomegaly_64 / "train")
    # the grown folder splits differently: recomputing (what these readers did before split.csv)
    # would move some of the run's images to another split
    regrown, _ = task_split(combine([load_dataset(data, quiet=True)]).frame, "all14", seed=5)
    old = regrown[regrown["image_id"].isin(stored["image"])]
    assert set(old.loc[old["split"] == "test", "path"].astype(str)) != set(before["evaluation"])

    assert _seen(run) == before
