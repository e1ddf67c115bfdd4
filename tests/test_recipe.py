"""The small-data recipe's parts: patient-wise folds, intensity augmentation, focal loss, label
smoothing, mixup, EMA of the weights (resumed exactly), cross-validation summaries and the bench."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common import runs
from common.augment import random_intensity_batch
from common.data import load_dataset, patient_folds, task_split
from common.labels import LABELS
from common.optim import masked_bce, mixup
from common.paths import REPO_ROOT
from common.train import FitHooks, TrainConfig, fit

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")


def tiny(out: Path, data: list[Path], **kw) -> TrainConfig:
    base = dict(data=[str(d) for d in data], model_name="test_efficientnet", image_size=32, batch_size=16,
                epochs=1, num_workers=0, n_boot=20, progress=False, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- folds


def test_every_patient_is_tested_in_exactly_one_fold_and_rare_findings_in_every_fold(nih_sample, cardiomegaly_64):
    frame = pd.concat([load_dataset(nih_sample).frame, load_dataset(cardiomegaly_64).frame], ignore_index=True)
    rows, labels = task_split(frame, "all14", seed=3, folds=5, fold=0)
    tested = pd.Series(0, index=rows.index)
    for k in range(5):
        split = patient_folds(rows, labels, 5, k, seed=3)
        assert set(split) == {"train", "dev", "test"}
        # no patient crosses a split
        assert (rows.assign(s=split).groupby("patient_id")["s"].nunique() == 1).all()
        tested += split == "test"
        test = rows[split == "test"]
        assert 0.17 < len(test) / len(rows) < 0.23
        for name in ("Edema", "Hernia"):  # 12 and 13 positives among the 400: stratified, 2-3 per fold
            assert (test[name] == 1).sum() >= 2, (k, name)
        dev = (split == "dev").sum() / (split != "test").sum()
        assert abs(dev - 0.1 / 0.8) < 0.02
    assert (tested == 1).all()  # every image is a test image exactly once
    # deterministic per seed, different across seeds
    a = patient_folds(rows, labels, 5, 2, seed=3)
    assert a.equals(patient_folds(rows, labels, 5, 2, seed=3))
    assert not a.equals(patient_folds(rows, labels, 5, 2, seed=4))
    with pytest.raises(ValueError, match="folds"):
        patient_folds(rows, labels, 5, 5)


def test_fold_settings_are_validated():
    with pytest.raises(ValueError, match="folds=1"):
        TrainConfig(folds=1, out="r").validate()
    with pytest.raises(ValueError, match="fold=5"):
        TrainConfig(folds=5, fold=5, out="r").validate()
    with pytest.raises(ValueError, match="loss="):
        TrainConfig(loss="hinge", out="r").validate()
    with pytest.raises(ValueError, match="intensity="):
        TrainConfig(intensity=1.5, out="r").validate()


# ----------------------------------------------------------------------------- augmentation and losses


def test_intensity_augmentation_is_seeded_bounded_and_off_at_zero():
    x = torch.rand(8, 1, 16, 16)
    a = random_intensity_batch(x, torch.Generator().manual_seed(0), 0.8)
    b = random_intensity_batch(x, torch.Generator().manual_seed(0), 0.8)
    c = random_intensity_batch(x, torch.Generator().manual_seed(1), 0.8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x)
    assert random_intensity_batch(x, torch.Generator().manual_seed(0), 0.0) is x


def test_focal_and_smoothing_change_the_loss_as_defined_and_keep_the_mask():
    logits = torch.tensor([[3.0, -2.0, 0.5], [-1.0, 0.2, 4.0]])
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    plain = masked_bce(logits, y)
    assert torch.allclose(masked_bce(logits, y, smoothing=0.0, focal_gamma=0.0), plain)
    known = ~torch.isnan(y)
    p = torch.sigmoid(logits[known])
    t = y[known]
    p_t = p * t + (1 - p) * (1 - t)
    expected = (-(1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert torch.allclose(masked_bce(logits, y, focal_gamma=2.0), expected, atol=1e-6)
    s = 0.2
    ts = t * (1 - s) + s / 2
    expected_s = -(ts * torch.log(p) + (1 - ts) * torch.log(1 - p)).mean()
    assert torch.allclose(masked_bce(logits, y, smoothing=s), expected_s, atol=1e-6)
    # the unknown label still gets no gradient
    z = logits.clone().requires_grad_(True)
    masked_bce(z, y, smoothing=0.1, focal_gamma=2.0).backward()
    assert z.grad[0, 2] == 0 and (z.grad[known] != 0).all()


def test_mixup_keeps_unknown_labels_unknown():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    mx, my = mixup(x, y, alpha=0.4, seed=7)
    mx2, my2 = mixup(x, y, alpha=0.4, seed=7)
    assert torch.equal(mx, mx2) and torch.equal(my.nan_to_num(-1), my2.nan_to_num(-1))
    lam_images = mx[:, 0, 0, 0]
    assert not torch.equal(lam_images, x[:, 0, 0, 0])  # mixed
    assert torch.isnan(my[0, 1])  # unknown in image 0 stays unknown
    assert torch.isnan(my[:, 1]).sum() == 2  # and makes its partner's mixed label unknown
    known = ~torch.isnan(my)
    assert ((my[known] >= 0) & (my[known] <= 1)).all()
    assert mixup(x, y, alpha=0.0, seed=7)[0] is x


# ----------------------------------------------------------------------------- the loop


def test_a_run_with_every_recipe_knob_resumes_to_the_same_weights(tmp_path, nih_sample, cardiomegaly_64):
    knobs = dict(ema=0.9, mixup=0.3, intensity=0.5, loss="focal", label_smoothing=0.05, folds=5, fold=1,
                 in_chans=1, checkpoint_every=5, warmup_steps=0, epochs=2)
    straight = fit(tiny(tmp_path / "straight", [nih_sample, cardiomegaly_64], **knobs))

    class Crash(Exception):
        pass

    calls = []

    def crash_in_epoch_2(loss, logits, targets, inputs):  # the loss unchanged, until the crash
        calls.append(1)
        if len(calls) == 48:
            raise Crash
        return loss

    with pytest.raises(Crash):
        fit(tiny(tmp_path / "resumed", [nih_sample, cardiomegaly_64], **knobs), FitHooks(loss=crash_in_epoch_2))
    resumed = fit(tiny(tmp_path / "resumed", [nih_sample, cardiomegaly_64], **knobs))
    assert "resuming" in (resumed / runs.LOG).read_text()
    a, b = runs.load_weights(straight / runs.BEST), runs.load_weights(resumed / runs.BEST)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = runs.torch_load_safe(straight / runs.LAST)
    assert "ema" in ckpt  # the average is part of the checkpoint
    # the kept weights are the average, not the last raw weights
    raw = ckpt["model"]
    assert any(not torch.equal(raw[k], a[k]) for k in a if a[k].is_floating_point())
    split = pd.read_csv(straight / runs.SPLIT_CSV)
    assert 0.17 < (split["split"] == "test").mean() < 0.23
    metrics = json.loads((straight / runs.METRICS_JSON).read_text())
    assert metrics["run"]["train_seconds"] > 0


def test_cross_validation_summarises_every_fold_and_the_bench_writes_its_table(tmp_path, nih_sample, cardiomegaly_64):
    from common.experiments import cross_validate, paired_difference

    cfg = tiny("", [nih_sample, cardiomegaly_64], max_steps=2, in_chans=1)
    cv = cross_validate(cfg, folds=3, name="tiny", runs=tmp_path / "runs")
    oof = cv.out_of_fold()
    assert sorted(oof["fold"].unique()) == [0, 1, 2]
    assert oof["image"].is_unique  # every image tested once
    assert len(oof) > 900
    summary = cv.summary(n_boot=20)
    assert set(summary["labels"]) == set(LABELS)
    cardio = summary["labels"]["Cardiomegaly"]
    assert cardio["folds"] == 3 and cardio["low"] <= cardio["mean"] <= cardio["high"]
    assert 0 <= cardio["pooled"] <= 1
    assert summary["seconds_per_fold"] >= 0  # two optimiser steps: may round to 0.0 s
    same = paired_difference(cv, cv)
    assert same[0] == 0
    again = cross_validate(cfg, folds=3, name="tiny", runs=tmp_path / "runs")
    assert all(r.reused for r in again.runs)

    table = tmp_path / "search.md"
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_recipe.py"), "--data", str(nih_sample), "--data",
         str(cardiomegaly_64), "--recipes", "base", "--folds", "2", "--only", "0", "--set", "max_steps=1",
         "image_size=32", "model_name=\"test_efficientnet\"", "--runs", str(tmp_path / "bench-runs"), "--table",
         str(table)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| recipe |") and lines[-1].startswith("| base |") and "| 1/2 |" in lines[-1]
    detail = [json.loads(s) for s in table.with_suffix(".jsonl").read_text().splitlines()]
    assert detail[-1]["recipe"] == "base" and not math.isnan(detail[-1]["summary"]["minutes_per_fold"])


# ----------------------------------------------------------------------------- the default recipe


def test_train_uses_the_small_data_recipe_on_real_data_without_weights_and_explicit_options_win(
        nih_sample, cardiomegaly_64, tmp_path):
    from common.cli import build_parser
    from common.commands.train import config_from_args
    from common.paths import SYNTHETIC_MARKER
    from common.train_config import SMALL_DATA_RECIPE

    parser = build_parser()

    def cfg(*argv):
        return config_from_args(parser.parse_args(["train", "--out", "r", *argv]))

    real = cfg("--data", str(nih_sample), "--data", str(cardiomegaly_64))
    assert {k: getattr(real, k) for k in SMALL_DATA_RECIPE} == SMALL_DATA_RECIPE
    # an explicit option wins over the recipe, the rest of the recipe stays
    mine = cfg("--data", str(nih_sample), "--epochs", "3", "--model", "efficientnet_b0")
    assert mine.epochs == 3 and mine.model_name == "efficientnet_b0"
    assert mine.in_chans == SMALL_DATA_RECIPE["in_chans"]
    # pretrained weights: the study's settings (meant for them)
    study = TrainConfig(out="r")
    hub = cfg("--data", str(nih_sample), "--pretrained")
    assert (hub.epochs, hub.image_size, hub.model_name) == (study.epochs, study.image_size, study.model_name)
    assert cfg("--data", str(nih_sample), "--recipe", "study").epochs == study.epochs
    # synthetic data keeps the faster study defaults unless asked
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / SYNTHETIC_MARKER).write_text("{}")
    assert cfg("--data", str(fake)).epochs == study.epochs
    assert cfg("--data", str(fake), "--recipe", "small-data").epochs == SMALL_DATA_RECIPE["epochs"]


def test_knobs_added_later_keep_earlier_runs_keys_and_checkpoints(nih_sample):
    from common.experiments.runcache import run_key
    from common.train_config import ADDED_KNOBS
    from common.train_state import check_same_run

    cfg = TrainConfig(data=[str(nih_sample)], out="r")
    key = run_key(cfg)
    for name, neutral in ADDED_KNOBS.items():
        assert getattr(cfg, name) == neutral, name  # the default computes what runs did before the knob
    assert run_key(TrainConfig(data=[str(nih_sample)], out="r", ema=0.99)) != key
    assert run_key(TrainConfig(data=[str(nih_sample)], out="r", folds=5, fold=0)) != key
    # a checkpoint written before the knobs existed resumes; one with another value does not
    saved = {k: v for k, v in cfg.asdict().items() if k not in ADDED_KNOBS}
    assert check_same_run(saved, cfg, Path("r")) == []
    with pytest.raises(ValueError, match="mixup"):
        check_same_run(saved, TrainConfig(data=[str(nih_sample)], out="r", mixup=0.2), Path("r"))


def test_the_quick_profile_follows_the_recipe_on_real_data_only(nih_sample, cardiomegaly_64):
    from common.experiments.datasets import resolve_data
    from common.experiments.profiles import get_profile
    from common.experiments.stages import train_config
    from common.synthetic import ensure_default
    from common.train_config import SMALL_DATA_RECIPE

    quick = get_profile("quick")
    real = train_config(quick, "resnet50", "all14", resolve_data(nih_sample, cardiomegaly_64))
    recipe = {k: v for k, v in SMALL_DATA_RECIPE.items() if k != "model_name"}
    assert {k: getattr(real, k) for k in recipe} == recipe
    assert real.model_name == quick.model_for("resnet50")  # the experiment's backbone stays
    assert train_config(quick, "resnet50", "all14", resolve_data(nih_sample, cardiomegaly_64), epochs=2).epochs == 2
    nih, cardio = ensure_default()
    synthetic = train_config(quick, "resnet50", "all14", resolve_data(nih, cardio))
    assert (synthetic.epochs, synthetic.image_size, synthetic.in_chans) == (quick.epochs, quick.image_size, 3)
    smoke = train_config(get_profile(smoke=True), "resnet50", "all14", resolve_data(nih_sample, cardiomegaly_64))
    assert smoke.max_steps == 2 and smoke.epochs == 1


def test_the_studys_backbone_trains_as_the_recipes_model_on_real_data_and_the_ablation_keeps_efficientnet(
        tmp_path, nih_sample, cardiomegaly_64):
    from common.experiments import STUDY_MODEL, Knobs
    from common.experiments.datasets import resolve_data
    from common.experiments.profiles import get_profile
    from common.experiments.stages import setup, train_config
    from common.synthetic import ensure_default
    from common.train_config import SMALL_DATA_RECIPE

    quick, real = get_profile("quick"), resolve_data(nih_sample, cardiomegaly_64)
    assert train_config(quick, STUDY_MODEL, "all14", real).model_name == SMALL_DATA_RECIPE["model_name"]
    assert train_config(quick, STUDY_MODEL, "all14", real, as_named=True).model_name == quick.model_for(STUDY_MODEL)
    assert train_config(quick, "efficientnet_b0", "all14", real).model_name == "efficientnet_b0"  # named: as named
    nih, cardio = ensure_default()
    assert train_config(quick, STUDY_MODEL, "all14", resolve_data(nih, cardio)).model_name == quick.model_for(STUDY_MODEL)
    on_real = setup(Knobs(data_full=nih_sample, data_cardiomegaly=cardiomegaly_64, runs_dir=tmp_path))
    assert on_real.model_for(STUDY_MODEL) == "resnet18" and "small-data recipe" in on_real.label
    on_synthetic = setup(Knobs(data_full=nih, data_cardiomegaly=cardio, runs_dir=tmp_path))
    assert on_synthetic.label == quick.label and on_synthetic.model_for(STUDY_MODEL) == "efficientnet_b0"


def test_a_patient_is_in_the_same_fold_for_both_tasks(nih_sample, cardiomegaly_64):
    frame = pd.concat([load_dataset(nih_sample).frame, load_dataset(cardiomegaly_64).frame], ignore_index=True)
    for k in range(3):
        all14, _ = task_split(frame, "all14", seed=5, folds=3, fold=k)
        cardio, _ = task_split(frame, "cardiomegaly", seed=5, folds=3, fold=k)
        assert len(cardio) < len(all14)
        both = cardio.merge(all14[["image_id", "split"]], on="image_id", suffixes=("", "_all14"))
        assert len(both) == len(cardio) and (both["split"] == both["split_all14"]).all()


def test_the_init_comparison_runs_every_start_on_the_same_folds(tmp_path, nih_sample, cardiomegaly_64):
    from common.experiments import compare_inits
    from common.pretrain import pretrain
    from common.pretrain_config import PretrainConfig

    ssl = pretrain(PretrainConfig(data=[str(nih_sample)], model_name="test_resnet", in_chans=1, image_size=32,
                                  batch_size=32, max_steps=2, proj_dim=64, pred_dim=16, num_workers=0,
                                  progress=False, out=str(tmp_path / "ssl")))
    cfg = tiny("", [nih_sample, cardiomegaly_64], model_name="test_resnet", in_chans=1, max_steps=2)
    table = compare_inits(cfg, ssl, folds=3, runs=tmp_path / "runs", only=[0, 1])
    assert table["start"].tolist() == ["random init", "self-supervised", "stage 1", "self-supervised + stage 1"]
    assert (table["folds"] == 2).all()
    assert table.loc[0, "vs random init"]["mean"] is None
    assert all(r["mean"] is not None for r in table["vs random init"][1:])
    assert table.loc[0, "pooled vs random init"]["mean"] is None
    for r in table["pooled vs random init"][1:]:  # every out-of-fold image once, one paired bootstrap
        assert r["low"] <= r["mean"] <= r["high"]
    # each stage 2 with a stage 1 started from that fold's stage 1, which started from the SSL backbone
    runs_root = tmp_path / "runs"
    configs = [json.loads(p.read_text()) for p in runs_root.glob("*/config.json")]
    stage1 = [c for c in configs if c["train"]["task"] == "cardiomegaly"]
    assert sorted(c["train"]["fold"] for c in stage1) == [0, 0, 1, 1]
    assert sum(c["train"]["init_from"] == str(ssl) for c in stage1) == 2
    stage2_from_stage1 = [c for c in configs if c["train"]["task"] == "all14" and c["train"]["init_from"]
                          and "cardiomegaly" in Path(c["train"]["init_from"]).name]
    assert len(stage2_from_stage1) == 4
    for c in stage2_from_stage1:
        source = json.loads((Path(c["train"]["init_from"]) / "config.json").read_text())
        assert source["train"]["fold"] == c["train"]["fold"]


def test_the_default_recipe_is_the_one_the_search_chose():
    import importlib.util

    from common.train_config import SMALL_DATA_RECIPE

    spec = importlib.util.spec_from_file_location("bench_recipe", REPO_ROOT / "bench" / "bench_recipe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    chosen = {**bench.BASE, **bench.RECIPES[bench.WINNER][1]}
    assert {k: chosen[k] for k in SMALL_DATA_RECIPE} == SMALL_DATA_RECIPE
    # what the recipe leaves out is the study's default, so `medimaging train` computes the winner
    study = TrainConfig(out="r")
    for k, v in chosen.items():
        if k not in SMALL_DATA_RECIPE and k not in ("task", "n_boot", "num_workers", "progress"):
            assert getattr(study, k) == v, k
