"""TensorBoard: `fit` writes each scored epoch as event files in the run folder, and nothing else
about the run changes (metrics.json and the weights are byte for byte the same without them)."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from common import runs, train_state
from common.labels import LABELS
from common.train import TrainConfig, fit

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")  # random init on purpose


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run folder's event files: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _config(out: Path, data: Path) -> TrainConfig:
    # two epochs of a tiny model at 32 px on the NIH sample (4 steps each): a few seconds
    return TrainConfig(data=[str(data)], task="all14", model_name="test_efficientnet", image_size=32, batch_size=64,
                       epochs=2, num_workers=0, n_boot=10, progress=False, out=str(out))


def test_fit_writes_loss_auroc_per_label_and_lr_for_tensorboard(tmp_path, nih_sample, monkeypatch):
    pytest.importorskip("tensorboard", reason="requirements.txt installs tensorboard")
    cfg = _config(tmp_path / "with", nih_sample)
    run = fit(cfg)
    events = sorted(run.glob(runs.TENSORBOARD_EVENTS))
    assert len(events) == 1, events
    scalars = _scalars(run)
    history = [row for row in csv.DictReader((run / runs.METRICS_CSV).open())]
    assert len(history) == 2  # two scored epochs
    steps = [int(row["step"]) for row in history]
    for tag, column in (("loss/train", "train_loss"), ("loss/dev", "dev_loss"), ("dev/mean_auroc", "dev_mean_auroc"),
                        ("lr", "lr")):
        assert [s for s, _ in scalars[tag]] == steps, tag
        assert [v for _, v in scalars[tag]] == pytest.approx([float(row[column]) for row in history], rel=1e-5), tag
    per_label = {tag.split("/", 1)[1] for tag in scalars if tag.startswith("dev_auroc/")}
    assert per_label and per_label <= set(LABELS)
    # the mean of the per-label series is the logged mean, epoch by epoch
    for i, (_, mean) in enumerate(scalars["dev/mean_auroc"]):
        values = [scalars[f"dev_auroc/{label}"][i][1] for label in per_label]
        assert sum(values) / len(values) == pytest.approx(mean, rel=1e-5)

    # the same run without TensorBoard: the run's own outputs are byte for byte the same
    monkeypatch.setattr(train_state.TensorBoardLog, "__init__", _disabled)
    plain = fit(dataclasses.replace(cfg, out=str(tmp_path / "without")))
    assert not list(plain.glob(runs.TENSORBOARD_EVENTS))
    for name in (runs.BEST, runs.THRESHOLDS, runs.TEST_PREDICTIONS):
        assert (plain / name).read_bytes() == (run / name).read_bytes(), name
    timed = [json.loads((r / runs.METRICS_JSON).read_text()) for r in (plain, run)]
    for m in timed:
        m["run"].pop("train_seconds")  # wall-clock: the one field that differs
    assert timed[0] == timed[1]


def _disabled(self, out, log, enabled=True, resume_step=None):
    self.writer = None


def test_a_fresh_start_in_an_old_folder_drops_the_old_curves(tmp_path, nih_sample):
    pytest.importorskip("tensorboard", reason="requirements.txt installs tensorboard")
    out = tmp_path / "run"
    out.mkdir()
    stale = out / "events.out.tfevents.1.old-host.1.0"
    stale.write_bytes(b"")
    logged = []
    board = train_state.TensorBoardLog(out, logged.append)
    try:
        assert not stale.exists()
        board.epoch({"step": 3, "train_loss": 0.5, "dev_loss": None, "dev_mean_auroc": 0.6, "lr": 1e-3},
                    {"Cardiomegaly": 0.6, "Effusion": None})
    finally:
        board.close()
    scalars = _scalars(out)
    assert scalars["loss/train"] == [(3, 0.5)] and "loss/dev" not in scalars
    assert list(scalars) and "dev_auroc/Effusion" not in scalars and scalars["dev_auroc/Cardiomegaly"][0][0] == 3


def test_a_resumed_run_drops_the_points_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="requirements.txt installs tensorboard")
    out = tmp_path / "run"
    out.mkdir()
    first = train_state.TensorBoardLog(out, print)
    for step, loss in ((3, 0.9), (6, 0.8), (9, 0.7)):  # killed after step 9 was logged, checkpoint at step 6
        first.epoch({"step": step, "train_loss": loss, "lr": 1e-3}, None)
    first.close()
    resumed = train_state.TensorBoardLog(out, print, resume_step=6 + 1)  # what fit passes: checkpoint step + 1
    for step, loss in ((9, 0.65), (12, 0.6)):
        resumed.epoch({"step": step, "train_loss": loss, "lr": 1e-3}, None)
    resumed.close()
    assert _scalars(out)["loss/train"] == [(3, pytest.approx(0.9)), (6, pytest.approx(0.8)),
                                          (9, pytest.approx(0.65)), (12, pytest.approx(0.6))]
