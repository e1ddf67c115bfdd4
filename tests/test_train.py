"""The training engine on real NIH images: complete run dirs, task selection, masking, init_from, freeze."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common import runs
from common.labels import LABELS
from common.train import TrainConfig, WarmupCosine, fit, masked_bce, select_task

# every model here starts from random init on purpose; its warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")

RUN_FILES = ("config.json", "metrics.csv", "log.txt", "checkpoints/last.pt", "best.safetensors",
             "thresholds.json", "metrics.json", "test_predictions.csv", "roc.png", "split.csv")
METRIC_KEYS = ("n_images", "labels", "n_positive", "auroc", "auroc_ci", "mean_auroc", "mean_auroc_ci", "auprc",
               "mean_auprc", "accuracy", "mean_accuracy", "thresholds", "sensitivity", "specificity", "f1",
               "baseline_all_absent_accuracy", "mean_baseline_all_absent_accuracy")


def tiny(out: Path, data: list[Path], **kw) -> TrainConfig:
    """A few-second configuration of the real training path: tiny timm model, 32 px images."""
    base = dict(data=[str(d) for d in data], model_name="test_efficientnet", image_size=32, batch_size=16,
                epochs=1, num_workers=0, n_boot=20, progress=False, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- pure parts


def test_config_round_trip_and_validation():
    cfg = TrainConfig(data=["a", "b"], task="cardiomegaly", pretrained="/w.safetensors", max_steps=3, out="r")
    d = json.loads(json.dumps(cfg.asdict()))  # through JSON, as config.json stores it
    assert TrainConfig.from_dict(d) == cfg
    assert TrainConfig().model_name == "tf_efficientnet_b4.ns_jft_in1k" and TrainConfig().seed == 49
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="task="):
        TrainConfig(task="pneumonia", out="r").validate()
    with pytest.raises(ValueError, match="out"):
        TrainConfig().validate()


def test_select_task_rules():
    nan = np.nan

    def row(image_id, source, **labels):
        values = {n: labels.get(n, 0.0 if source == "nih" else nan) for n in LABELS}
        return {"image_id": image_id, "patient_id": image_id[:8], "source": source, **values}

    frame = pd.DataFrame([
        row("00000001_000.png", "nih", Cardiomegaly=1.0, Effusion=1.0),  # cardiomegaly + other finding: kept
        row("00000002_000.png", "nih"),  # No Finding: kept
        row("00000003_000.png", "nih", Effusion=1.0),  # another finding only: not for the binary task
        row("00000004_000.png", "cardio", Cardiomegaly=0.0),  # binary source: kept
        row("00000005_000.png", "cardio"),  # unlabelled (leaderboard test image): dropped
        row("00000002_000.png", "cardio", Cardiomegaly=0.0),  # same image in two datasets: kept once
    ])
    cardio, labels = select_task(frame, "cardiomegaly")
    assert labels == ["Cardiomegaly"]
    assert cardio["image_id"].tolist() == ["00000001_000.png", "00000002_000.png", "00000004_000.png"]
    assert cardio.loc[1, "source"] == "nih"  # the duplicate keeps the row with most known labels
    all14, labels = select_task(frame, "all14")
    assert labels == list(LABELS)
    assert all14["image_id"].tolist() == ["00000001_000.png", "00000002_000.png", "00000003_000.png",
                                          "00000004_000.png"]


def test_masked_labels_give_zero_gradient():
    from common.models import build_model

    torch.manual_seed(0)
    model = build_model("test_efficientnet", num_labels=4, head="mlp", image_size=32)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, np.nan, 1.0]] * 3 + [[0.0, 1.0, np.nan, np.nan]] * 3)
    logits = model(x)
    loss = masked_bce(logits, y)
    # equals plain BCE over the known entries only
    known = ~torch.isnan(y)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[known])
    assert torch.allclose(loss, expected)
    loss.backward()
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert torch.all(last.weight.grad[2] == 0) and last.bias.grad[2] == 0  # never labelled: no gradient
    assert torch.any(last.weight.grad[3] != 0) and torch.any(last.weight.grad[0] != 0)
    # per-entry: a NaN target's logit gets exactly zero gradient
    z = torch.zeros(2, 3, requires_grad=True)
    masked_bce(z, torch.tensor([[1.0, np.nan, 0.0], [np.nan, np.nan, 1.0]])).backward()
    assert z.grad[0, 1] == 0 and z.grad[1, 0] == 0 and z.grad[1, 1] == 0 and z.grad[0, 0] != 0


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup_steps=4, total_steps=20, min_ratio=0.1)
    ramp = [s(i) for i in range(4)]
    assert ramp == sorted(ramp) and ramp[-1] < 1.0
    assert s(4) == pytest.approx(1.0)
    decay = [s(i) for i in range(4, 21)]
    assert decay == sorted(decay, reverse=True)
    assert s(20) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)


def test_train_help_lists_flags():
    from common.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    text = sub.format_help()
    for flag in ("--data", "--task", "--model", "--head", "--pretrained", "--image-size", "--epochs", "--max-steps",
                 "--batch-size", "--lr", "--init-from", "--freeze", "--seed", "--workers", "--device", "--out"):
        assert flag in text, flag
    args = parser.parse_args(["train", "--out", "r", "--data", "a", "--data", "b", "--pretrained", "--max-steps", "2"])
    from common.commands.train import config_from_args

    cfg = config_from_args(args)
    assert cfg.data == ["a", "b"] and cfg.pretrained is True and cfg.max_steps == 2 and cfg.out == "r"
    assert config_from_args(parser.parse_args(["train", "--out", "r", "--pretrained", "w.pt"])).pretrained == "w.pt"


# ----------------------------------------------------------------------------- real runs


def test_fit_writes_a_complete_run_dir(tmp_path, nih_sample):
    from common.images import read_grayscale
    from common.preprocess import resize_gray, to_model_input

    out = fit(tiny(tmp_path / "run", [nih_sample], max_steps=3))
    for name in RUN_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    cfg = runs.read_config(out)
    assert cfg["labels"] == list(LABELS)
    assert cfg["model"] == {"model_name": "test_efficientnet", "num_labels": 14, "head": "mlp", "in_chans": 3,
                            "image_size": 32, "head_dropout": 0.3}
    assert cfg["input"]["image_size"] == 32 and len(cfg["input"]["mean"]) == 3
    assert TrainConfig.from_dict(cfg["train"]).max_steps == 3
    assert cfg["data"][0]["images"] == 400 and cfg["data"][0]["layout"] == "nih"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics, key
    assert set(metrics["auroc"]) == set(LABELS)
    assert metrics["run"]["steps"] == 3 and metrics["dev"]["n_images"] == cfg["split"]["dev"]
    history = pd.read_csv(out / "metrics.csv")
    assert history["step"].tolist() == [3] and {"train_loss", "dev_loss", "dev_mean_auroc"} <= set(history)

    pred = pd.read_csv(out / "test_predictions.csv")
    assert list(pred.columns) == ["Image Index", *LABELS]
    assert len(pred) == metrics["n_images"] == cfg["split"]["test"] > 0
    assert pred["Image Index"].is_unique
    assert pred[list(LABELS)].apply(lambda c: c.between(0, 1)).all().all()
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert set(thresholds) == set(LABELS)

    # load_run rebuilds the model; on the inference pipeline it gives the predictions training wrote
    run = runs.load_run(out)
    assert run.labels == list(LABELS)
    ids = pred["Image Index"].tolist()[:4]
    images = np.stack([resize_gray(read_grayscale(nih_sample / "images" / i), 32) for i in ids])
    x = torch.from_numpy(to_model_input(images, run.input["mean"], run.input["std"], run.input["in_chans"]))
    with torch.no_grad():
        prob = torch.sigmoid(run.model(x)).numpy()
    np.testing.assert_allclose(prob, pred[list(LABELS)].to_numpy()[:4], atol=1e-5)

    # a finished run is not trained again
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert fit(tiny(tmp_path / "run", [nih_sample], max_steps=3)) == out
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
    # ... and a different model in the same folder is refused, not mixed in
    with pytest.raises(ValueError, match="different settings.*model_name"):
        fit(tiny(tmp_path / "run", [nih_sample], max_steps=3, model_name="test_resnet"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, nih_sample, cardiomegaly_64) -> Path:
    """Stage 1: the binary Cardiomegaly task on the cardiomegaly set + NIH sample combined."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(tiny(tmp_path_factory.mktemp("stage1") / "run", [cardiomegaly_64, nih_sample],
                        task="cardiomegaly", max_steps=3))
    finally:
        torch.set_num_threads(n)


def test_cardiomegaly_task_on_combined_data(stage1, nih_sample, cardiomegaly_64):
    cfg = runs.read_config(stage1)
    assert cfg["labels"] == ["Cardiomegaly"] and cfg["model"]["num_labels"] == 1
    # independent count from the raw label files: every labelled image of the binary set, and from
    # the NIH sample only images that are Cardiomegaly or No Finding; an image in both counted once
    present = {p.name for p in (nih_sample / "images").iterdir()}
    entry = pd.read_csv(nih_sample / "Data_Entry_2017_v2020.csv", usecols=["Image Index", "Finding Labels"])
    entry = entry[entry["Image Index"].isin(present)]
    nih_ids = set(entry.loc[entry["Finding Labels"].str.contains("Cardiomegaly")
                            | (entry["Finding Labels"] == "No Finding"), "Image Index"])
    cardio = pd.concat([pd.read_csv(cardiomegaly_64 / f) for f in ("train.csv", "test.csv")])
    cardio_ids = set(cardio.loc[cardio["disease"].isin(["Cardiomegaly", "No Finding"]), "imageID"])
    assert sum(cfg["split"].values()) == len(nih_ids | cardio_ids)
    assert {d["layout"] for d in cfg["data"]} == {"cardiomegaly", "nih"}
    pred = pd.read_csv(stage1 / "test_predictions.csv")
    assert list(pred.columns) == ["Image Index", "Cardiomegaly"] and pred["Image Index"].is_unique
    # the binary set's own test folder is the official test split
    official_test = set(pd.read_csv(cardiomegaly_64 / "test.csv")["imageID"])
    assert official_test <= set(pred["Image Index"])
    metrics = json.loads((stage1 / "metrics.json").read_text())
    assert metrics["labels"] == ["Cardiomegaly"] and metrics["auroc"]["Cardiomegaly"] is not None


def _split_state(path: Path) -> tuple[dict, dict]:
    state = runs.load_weights(path)
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    assert backbone and head and len(backbone) + len(head) == len(state)
    return backbone, head


def test_init_from_stage1_then_freeze(stage1, tmp_path, nih_sample):
    s1_backbone, s1_head = _split_state(stage1 / "best.safetensors")
    # max_steps=0 scores the initial weights: the backbone is stage 1's, the head new (14 outputs)
    init = fit(tiny(tmp_path / "stage2_init", [nih_sample], init_from=str(stage1), max_steps=0))
    backbone, head = _split_state(init / "best.safetensors")
    assert backbone.keys() == s1_backbone.keys()
    assert all(torch.equal(backbone[k], s1_backbone[k]) for k in backbone)
    last = sorted(k for k in head if k.endswith(".weight"))[-1]
    assert head[last].shape[0] == 14 and s1_head[last].shape[0] == 1
    cfg = runs.read_config(init)
    assert cfg["init"]["source"] == str(stage1)
    assert set(cfg["init"]["kept"]) == set(s1_backbone)
    assert cfg["init"]["new"] and all("head" in k for k in cfg["init"]["new"])
    log = (init / "log.txt").read_text()
    assert f"init_from {stage1}: kept {len(cfg['init']['kept'])} keys" in log and "new" in log

    # head-only training: the frozen backbone (weights and BatchNorm statistics) does not move
    frozen = fit(tiny(tmp_path / "stage2_frozen", [nih_sample], init_from=str(stage1), freeze=-1, max_steps=3,
                      lr=1e-2))
    f_backbone, f_head = _split_state(frozen / "best.safetensors")
    assert all(torch.equal(f_backbone[k], s1_backbone[k]) for k in f_backbone)
    assert not torch.equal(f_head[last], head[last])  # same seed, same initial head: it trained
    assert runs.read_config(frozen)["frozen"]
    assert "freeze -1:" in (frozen / "log.txt").read_text()


def test_empty_test_split_still_finishes(tmp_path, nih_sample):
    out = fit(tiny(tmp_path / "run", [nih_sample], max_steps=1, split_fractions=(0.8, 0.2, 0.0), pos_weight=True))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 0 and "empty" in metrics["note"]
    pred = pd.read_csv(out / "test_predictions.csv")
    assert list(pred.columns) == ["Image Index", *LABELS] and len(pred) == 0
    log = (out / "log.txt").read_text()
    assert "test split is empty" in log
    # pos_weight = neg/pos on the train split: Hernia (13 of 400) weighs far more than Infiltration (79)
    weights = dict(item.rsplit(" ", 1) for item in log.split("pos_weight (neg/pos on train): ")[1].splitlines()[0].split(", "))
    assert list(weights) == list(LABELS) and float(weights["Hernia"]) > 3 * float(weights["Infiltration"]) > 3


def test_synthetic_data_flagged_and_unreadable_files_skipped(tmp_path):
    from common.synthetic import generate

    data = generate(tmp_path / "synthetic", layout="nih", n_images=60, image_size=32, progress=False, workers=1)
    files = sorted(data.rglob("*.png"))
    files[0].write_bytes(b"")  # zero-byte
    files[1].write_bytes(files[1].read_bytes()[:40])  # truncated
    out = fit(tiny(tmp_path / "run", [data], max_steps=1))
    cfg = runs.read_config(out)
    assert cfg["synthetic"] is True
    assert json.loads((out / "metrics.json").read_text())["run"]["synthetic"] is True
    log = (out / "log.txt").read_text()
    assert "SYNTHETIC" in log and "2 unreadable file(s) skipped" in log
    unreadable = pd.read_csv(out / "unreadable.csv")
    assert sorted(Path(p).name for p in unreadable["path"]) == [files[0].name, files[1].name]
    assert unreadable["reason"].str.len().min() > 0
    assert sum(cfg["split"].values()) == 58  # the other images all train, score or test
    assert not {files[0].name, files[1].name} & set(pd.read_csv(out / "test_predictions.csv")["Image Index"])


def test_early_stopping_ends_the_run_when_dev_stops_improving(tmp_path, nih_sample):
    # a frozen backbone and a vanishing learning rate: dev AUROC cannot improve after epoch 1
    out = fit(tiny(tmp_path / "run", [nih_sample], epochs=6, patience=2, freeze=-1, lr=1e-12, warmup_steps=0))
    history = pd.read_csv(out / "metrics.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["best"].tolist() == [True, False, False]
    assert "early stop" in (out / "log.txt").read_text()
    assert json.loads((out / "metrics.json").read_text())["run"]["best_epoch"] == 1
