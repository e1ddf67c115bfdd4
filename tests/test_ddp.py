"""`medimaging train` under `torchrun --nproc_per_node=2` (gloo, CPU): one run dir, every test image once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from common import runs
from common.data import load_dataset, patient_split
from common.labels import LABELS
from common.train import select_task

SPLIT = (0.7, 0.1075, 0.1925)  # 77 test and 43 dev images: odd, so DistributedSampler pads a duplicate


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, nih_sample):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "common", "train", "--data", str(nih_sample), "--model", "test_efficientnet", "--image-size", "32",
           "--batch-size", "8", "--grad-accum", "2", "--epochs", "1", "--workers", "0", "--device", "cpu",
           "--n-boot", "20", "--no-progress", "--split", *map(str, SPLIT), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::UserWarning"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # rank 0 alone prints the run and writes the log
    assert proc.stdout.count("run directory:") == 1
    log = (out / "log.txt").read_text()
    assert "2 processes" in log and log.count("epoch 1/1: step") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]

    frame, _ = select_task(load_dataset(nih_sample, quiet=True).frame, "all14")
    split = patient_split(frame, seed=49, fractions=SPLIT)
    expected_test = set(frame.loc[split == "test", "image_id"])
    assert len(expected_test) % 2 == 1
    pred = pd.read_csv(out / "test_predictions.csv")
    assert list(pred.columns) == ["Image Index", *LABELS]
    assert pred["Image Index"].is_unique and set(pred["Image Index"]) == expected_test

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == len(expected_test) and metrics["run"]["world_size"] == 2
    assert metrics["dev"]["n_images"] == int((split == "dev").sum())
    # 280 train images / 2 ranks / 8 per batch = 17 micro-batches, 2 per optimiser step -> 9 steps
    assert metrics["run"]["steps"] == 9
    assert runs.load_run(out).labels == list(LABELS)
