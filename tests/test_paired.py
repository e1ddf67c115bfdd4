"""Runs compared on the same held-out images: which images, and the table's verdicts."""
from __future__ import annotations

import json

import pytest

from common.experiments import Knobs
from common.experiments.inits import pretrain_config
from common.experiments.paired import paired_table, seen_patients, shared_test_images, verdict
from common.experiments.runcache import cached_pretrain
from common.experiments.stages import setup, stage1_run, stage2_run
from common.splits import PATIENT, SPLIT, run_split

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory, nih_sample, cardiomegaly_64):
    s = setup(Knobs(smoke=True, data_full=nih_sample, data_cardiomegaly=cardiomegaly_64,
                    runs_dir=tmp_path_factory.mktemp("runs")))
    stage1 = stage1_run(s, "test_resnet")
    return s, stage1, stage2_run(s, "test_resnet", stage1, "stage 2"), stage2_run(s, "test_resnet", None, "scratch")


def test_a_stage_2_run_has_seen_what_its_stage_1_trained_on(two_stages):
    _, stage1, stage2, scratch = two_stages
    def trained(run):
        frame = run_split(run.run_dir)
        return set(frame.loc[frame[SPLIT] != "test", PATIENT].astype(str))

    assert seen_patients(stage1.run_dir) == trained(stage1)
    assert seen_patients(stage2.run_dir) == trained(stage2) | trained(stage1)
    assert seen_patients(scratch.run_dir) == trained(scratch)
    labels, y, (p2, ps) = shared_test_images([stage2, scratch])
    assert len(y) == len(p2) == len(ps) > 0 and len(labels) == 14
    test = run_split(scratch.run_dir)
    test = test[test[SPLIT] == "test"]
    # the images compared: the common test split less every patient stage 1 trained or chose on
    assert len(y) == (~test[PATIENT].astype(str).isin(trained(stage1))).sum() < len(test)


def test_the_paired_table_says_what_its_interval_says(two_stages):
    s, _, stage2, scratch = two_stages
    table, effect = paired_table("t", ("without stage 1", scratch), [("from stage 1", stage2)], n_boot=50)
    row = table.frame.iloc[0]
    assert row["Compared"] == "from stage 1 minus without stage 1"
    assert row["Says"] == verdict(effect["from stage 1"]["ci"])
    assert int(row["Same test images"]) == len(shared_test_images([scratch, stage2])[1])
    assert verdict([0.01, 0.2]) == "better" and verdict([-0.3, -0.01]) == "worse"
    assert verdict([-0.1, 0.1]).startswith("cannot tell") and verdict(None) == "n/a"


def test_the_self_supervised_run_is_cached_and_fits_the_fine_tunes(two_stages, monkeypatch):
    s = two_stages[0]
    cfg = pretrain_config(s, "test_resnet")
    assert (cfg.model_name, cfg.max_steps, cfg.epochs) == ("test_resnet", 2, s.profile.pretrain_epochs)
    first = cached_pretrain(cfg, "ssl", s.runs)
    assert json.loads((first / "pretrain.json").read_text())["steps"] == 2

    def no_second_run(*a, **k):
        raise AssertionError("a finished pretraining ran again")

    monkeypatch.setattr("common.pretrain.pretrain", no_second_run)
    assert cached_pretrain(cfg, "ssl", s.runs) == first
    tuned = stage2_run(s, "test_resnet", first, "from ssl")
    assert tuned.config()["train"]["init_from"] == str(first)
