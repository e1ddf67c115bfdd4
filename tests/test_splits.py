"""A run's split is stored by `fit` (split.csv) and read back by `common.splits`: images added to
the data folder after training never move into the run's splits."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from common import runs
from common.data import combine, load_dataset, task_split
from common.labels import LABELS
from common.splits import run_split, split_paths
from common.train import TrainConfig, fit

# the tiny run starts from random init on purpose; its warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cardiomegaly_64) -> tuple[Path, Path]:
    """(run, data folder): a two-step run on a copy of the 64 px Cardiomegaly set."""
    data = tmp_path_factory.mktemp("data") / "cardio"
    shutil.copytree(cardiomegaly_64, data)
    out = tmp_path_factory.mktemp("run") / "run"
    fit(TrainConfig(data=[str(data)], task="cardiomegaly", model_name="test_efficientnet", image_size=32,
                    batch_size=16, epochs=1, max_steps=2, num_workers=0, n_boot=20, progress=False, seed=3,
                    out=str(out)))
    return out, data


def _recomputed(data: Path, seed: int = 3) -> pd.DataFrame:
    frame, _ = task_split(combine([load_dataset(data, quiet=True)]).frame, "cardiomegaly", seed=seed)
    return frame


def _add_patients(data: Path, n: int = 40) -> None:
    """n new patients' images (copies of existing files) with labels, as a user adding data would."""
    table = pd.read_csv(data / "train.csv")
    sources = sorted((data / "train").iterdir())[:n]
    rows = []
    for i, src in enumerate(sources):
        name = f"{90000000 + i:08d}_000.png"
        shutil.copy(src, data / "train" / name)
        rows.append({"imageID": name, "disease": "Cardiomegaly" if i % 2 else "No Finding"})
    pd.concat([table, pd.DataFrame(rows)]).to_csv(data / "train.csv", index=False)


def test_fit_stores_the_split_it_trained_on(trained):
    run, data = trained
    stored = pd.read_csv(run / runs.SPLIT_CSV, dtype=str)
    assert list(stored.columns) == ["image", "patient", "split"]
    expected = _recomputed(data)
    assert stored["image"].tolist() == expected["image_id"].tolist()
    assert stored["split"].tolist() == expected["split"].tolist()
    # no patient crosses a split
    assert stored.groupby("patient")["split"].nunique().max() == 1
    frame = run_split(run)
    assert list(frame.columns) == ["image", "path", "patient", "split", *LABELS]
    assert frame["path"].tolist() == expected["path"].astype(str).tolist()
    assert frame["Cardiomegaly"].tolist() == expected["Cardiomegaly"].tolist()
    # the test images are exactly those the run predicted
    predicted = pd.read_csv(run / runs.TEST_PREDICTIONS, dtype={"Image Index": str})["Image Index"].tolist()
    assert [Path(p).name for p in split_paths(run, "test")] == predicted


def test_images_added_after_training_do_not_change_the_split(trained, capsys):
    run, data = trained
    before = run_split(run)
    _add_patients(data)
    # recomputing from the grown folder would give another split: the stored one is what counts
    regrown = _recomputed(data)
    old = regrown[regrown["image_id"].isin(before["image"])].set_index("image_id")["split"]
    assert (old.loc[before["image"]].to_numpy() != before["split"].to_numpy()).any()
    after = run_split(run)
    pd.testing.assert_frame_equal(after, before)
    assert split_paths(run, "test") == before.loc[before["split"] == "test", "path"].tolist()
    assert "recomputing" not in capsys.readouterr().err


def test_a_run_without_split_csv_recomputes_it_with_a_note(trained, tmp_path, capsys):
    run, data = trained
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    (old / runs.SPLIT_CSV).unlink()
    frame = run_split(old)
    err = capsys.readouterr().err
    assert "no split.csv" in err and "recomputing" in err and len(err.strip().splitlines()) == 1
    expected = _recomputed(data)  # the data folder as it is now (images were added by the test above)
    assert frame["image"].tolist() == expected["image_id"].tolist()
    assert frame["split"].tolist() == expected["split"].tolist()


def test_split_paths_names_a_known_split(trained):
    with pytest.raises(ValueError, match="split='val'"):
        split_paths(trained[0], "val")
