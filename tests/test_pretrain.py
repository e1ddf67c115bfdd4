"""Self-supervised pretraining (`medimaging pretrain`, common.pretrain) on real NIH images, tiny and fast:
the loss falls without collapsing, an interrupted run resumes exactly, the run is an --init-from
source for `medimaging train`, unlabelled images count, and the command line reports and refuses."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from common import cli, runs
from common.data import DatasetError
from common.pretrain import (
    LOSS_PNG,
    PRETRAIN_JSON,
    STEPS_CSV,
    PretrainConfig,
    TwoViews,
    image_paths,
    pretrain,
)

N_IMAGES = 96  # real 64 px radiographs: 3 steps of 32 per epoch


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory, cardiomegaly_64) -> Path:
    """A folder of real PNGs and nothing else: no label file, as a user's unlabelled images."""
    folder = tmp_path_factory.mktemp("plain") / "images"
    folder.mkdir()
    for src in sorted((cardiomegaly_64 / "train").glob("*.png"))[:N_IMAGES]:
        os.symlink(src, folder / src.name)
    return folder


def tiny(out: Path, data: list[Path], **kw) -> PretrainConfig:
    """A few-second pretraining of the real code path: a tiny timm model at 32 px."""
    base = dict(data=[str(d) for d in data], model_name="test_resnet", image_size=32, batch_size=32, epochs=2,
                proj_dim=128, pred_dim=32, num_workers=0, progress=False, out=str(out))
    base.update(kw)
    return PretrainConfig(**base)


# ----------------------------------------------------------------------------- pure parts


def test_config_round_trip_and_validation():
    cfg = PretrainConfig(data=["a"], crop_scale=(0.5, 0.9), pretrained="/w.safetensors", max_steps=4, out="r")
    assert PretrainConfig.from_dict(json.loads(json.dumps(cfg.asdict()))) == cfg  # through JSON, as stored
    with pytest.raises(ValueError, match="unknown key"):
        PretrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="batch_size=1"):
        PretrainConfig(batch_size=1, out="r").validate()
    with pytest.raises(ValueError, match="crop_scale"):
        PretrainConfig(crop_scale=(0.8, 0.2), out="r").validate()
    with pytest.raises(ValueError, match="out"):
        PretrainConfig().validate()


def test_views_are_seeded_and_keep_the_heart_on_its_side():
    """Two views differ from each other, the same seed gives the same views, and without --hflip the
    bright left half of every view stays on the left (with it, some views are mirrored)."""
    x = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    x[..., :16] = 255
    input_cfg = {"in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    cfg = PretrainConfig(out="r", crop_scale=(0.8, 1.0), rotate_degrees=5)
    views = TwoViews(cfg, input_cfg, torch.device("cpu"))
    a1, a2 = views(x, torch.Generator().manual_seed(3))
    b1, _ = views(x, torch.Generator().manual_seed(3))
    assert a1.shape == (16, 3, 32, 32) and torch.equal(a1, b1) and not torch.equal(a1, a2)
    assert bool((a1[..., :12].mean((1, 2, 3)) > a1[..., 20:].mean((1, 2, 3))).all())
    flipped = TwoViews(PretrainConfig(out="r", crop_scale=(0.8, 1.0), rotate_degrees=5, hflip=True), input_cfg,
                       torch.device("cpu"))(x, torch.Generator().manual_seed(3))[0]
    assert bool((flipped[..., :12].mean((1, 2, 3)) < flipped[..., 20:].mean((1, 2, 3))).any())


def test_image_paths_ignore_labels(tmp_path, plain_folder, cardiomegaly_64):
    """Every image file counts: a folder without a label file, and in a labelled layout the images of a
    test csv without labels and an image that no csv row names."""
    paths, info = image_paths([plain_folder])
    assert len(paths) == N_IMAGES and info[0]["images"] == N_IMAGES
    labelled = tmp_path / "cardio"
    images = sorted((cardiomegaly_64 / "train").glob("*.png"))[:3]
    for split, chosen in (("train", images[:1]), ("test", images[1:])):
        (labelled / split).mkdir(parents=True)
        for src in chosen:
            os.symlink(src, labelled / split / src.name)
    (labelled / "train.csv").write_text(f"imageID,disease\n{images[0].stem},Cardiomegaly\n")
    (labelled / "test.csv").write_text(f"imageID,disease\n{images[1].stem},\n")  # no label; images[2]: no row
    paths, _ = image_paths([labelled, labelled / "test"])  # a folder given twice over counts once
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in images)


@pytest.mark.parametrize("bad, message", [("missing", "folder not found"), ("file.png", "not a folder"),
                                          ("empty", "no image files")])
def test_image_paths_refuse_bad_folders(tmp_path, bad, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=message):
        image_paths([tmp_path / bad])


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, plain_folder) -> Path:
    """Ten epochs (30 steps) on the unlabelled folder."""
    return pretrain(tiny(tmp_path_factory.mktemp("pretrain") / "run", [plain_folder], epochs=10, lr=0.064))


def test_loss_falls_without_collapse_and_the_run_is_complete(pretrained_run):
    hist = pd.read_csv(pretrained_run / runs.METRICS_CSV)
    assert list(hist["epoch"]) == list(range(1, 11)) and hist["step"].iloc[-1] == 30
    # negative cosine similarity: ~0 for a random network, -1 when the two views agree
    # (measured with seeds 49, 1, 2: first epoch -0.02..0.01, last three -0.27..-0.40 on average)
    loss = hist["train_loss"]
    assert loss.iloc[-1] < loss.iloc[0] - 0.15 and loss.iloc[-3:].mean() < -0.2, loss.tolist()
    # ... and not by collapsing to one output (z_std ~1: spread, 0: constant)
    assert (hist["z_std"] > 0.5).all(), hist["z_std"].tolist()
    summary = json.loads((pretrained_run / PRETRAIN_JSON).read_text())
    assert summary["images"] == N_IMAGES and summary["epochs_done"] == 10 and summary["steps"] == 30
    assert summary["train_seconds"] > 0 and summary["images_per_s"] > 0
    assert summary["loss"] == pytest.approx(hist["train_loss"].tolist(), abs=1e-5)
    assert (pretrained_run / LOSS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = pd.read_csv(pretrained_run / STEPS_CSV)  # the curve step by step, each epoch's mean agrees
    assert list(steps["step"]) == list(range(1, 31))
    assert steps["loss"].groupby((steps["step"] - 1) // 3).mean().tolist() == pytest.approx(loss.tolist(), abs=1e-5)
    cfg = runs.read_config(pretrained_run)  # a run folder by common.runs' contract
    assert cfg["model"] == {"model_name": "test_resnet", "in_chans": 1, "image_size": 32}
    assert cfg["labels"] == [] and cfg["input"]["image_size"] == 32 and cfg["images"] == N_IMAGES
    weights = runs.load_weights(pretrained_run / runs.BEST)
    assert weights and all(k.startswith("backbone.") for k in weights)  # the backbone, no projector
    assert "epoch 10/10" in (pretrained_run / runs.LOG).read_text()


def test_interrupted_run_resumes_and_matches(tmp_path, plain_folder, monkeypatch):
    """Killed mid-epoch after a checkpoint (step 3 of 6), rerun: the same weights and losses as a run
    that was never interrupted."""
    import common.pretrain as pt

    straight = pretrain(tiny(tmp_path / "straight", [plain_folder], checkpoint_every=4))
    real_loss, calls = pt.simsiam_loss, {"n": 0}

    def dies_at_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # as a Ctrl-C between the checkpoint at step 4 and the epoch's end
        return real_loss(*args)

    monkeypatch.setattr(pt, "simsiam_loss", dies_at_step_6)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(cut, [plain_folder], checkpoint_every=4))
    state = runs.torch_load_safe(cut / runs.LAST)
    assert state["step"] == 4 and state["epoch"] == 1 and state["batch_in_epoch"] == 1  # mid-epoch 2
    monkeypatch.setattr(pt, "simsiam_loss", real_loss)
    pretrain(tiny(cut, [plain_folder], checkpoint_every=4))
    assert "resuming" in (cut / runs.LOG).read_text()
    a, b = runs.load_weights(cut / runs.BEST), runs.load_weights(straight / runs.BEST)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    cols = ["epoch", "step", "train_loss", "z_std", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(cut / runs.METRICS_CSV)[cols],
                                  pd.read_csv(straight / runs.METRICS_CSV)[cols], atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(pd.read_csv(cut / STEPS_CSV), pd.read_csv(straight / STEPS_CSV), atol=1e-6, rtol=0)
    # a finished run is not trained again; other settings are refused
    before = (cut / runs.LAST).stat().st_mtime_ns
    assert pretrain(tiny(cut, [plain_folder], checkpoint_every=4)) == cut
    assert (cut / runs.LAST).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="different settings"):
        pretrain(tiny(cut, [plain_folder], image_size=48))
    (cut / runs.LAST).unlink()  # a finished run stays finished without its checkpoint
    assert pretrain(tiny(cut, [plain_folder], checkpoint_every=4)) == cut and not (cut / runs.LAST).exists()


@pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")
def test_train_init_from_a_pretraining_run_starts_from_its_backbone(pretrained_run, tmp_path, cardiomegaly_64,
                                                                   capsys):
    out = tmp_path / "finetune"
    rc = cli.main(["train", "--data", str(cardiomegaly_64), "--task", "cardiomegaly", "--model", "test_resnet",
                   "--in-chans", "1", "--image-size", "32", "--init-from", str(pretrained_run), "--max-steps", "0",
                   "--workers", "0", "--n-boot", "10", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    backbone = runs.load_weights(pretrained_run / runs.BEST)
    step0 = runs.load_weights(out / runs.BEST)  # max_steps=0: the weights the fine-tuning starts from
    for k, v in backbone.items():
        assert torch.equal(step0[k], v), k
    init = runs.read_config(out)["init"]
    assert init["source"] == str(pretrained_run) and sorted(init["kept"]) == sorted(backbone)
    assert all(k.startswith("head.") for k in init["new"]) and init["dropped"] == []
    # a pretraining run is a source of weights, not a model to predict with or to list in the app
    with pytest.raises(ValueError, match="pretraining run"):
        runs.load_run(pretrained_run)
    assert pretrained_run not in runs.find_runs(pretrained_run.parent)
    with pytest.raises(ValueError, match="holds a training run"):  # never written over
        pretrain(tiny(out, [cardiomegaly_64]))


def test_cli_prints_a_summary_and_refuses_bad_data(tmp_path, plain_folder, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["pretrain", "--data", str(plain_folder), "--model", "test_resnet", "--image-size", "32",
                   "--batch-size", "32", "--epochs", "1", "--proj-dim", "64", "--pred-dim", "16", "--workers", "0",
                   "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"on {N_IMAGES} images: 1 epochs, 3 steps" in printed and "images/s" in printed and "loss " in printed
    assert f"run directory: {out}" in printed and f"--init-from {out} --model test_resnet --in-chans 1" in printed
    assert "epoch 1/1: step 3, loss" in printed  # the per-epoch progress line
    rc = cli.main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere: folder not found" in err and not (tmp_path / "bad").exists()
