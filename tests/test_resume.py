"""Resume: a `medimaging train` killed with SIGKILL mid-epoch and rerun ends exactly like an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from common import runs


def _command(data: Path, out: Path) -> list[str]:
    # 35 micro-batches per epoch, a checkpoint every 3 optimiser steps: last.pt appears early in epoch 1
    return [sys.executable, "-m", "common", "train", "--data", str(data), "--model", "test_efficientnet",
            "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--checkpoint-every", "3", "--workers", "0",
            "--n-boot", "50", "--no-progress", "--seed", "7", "--out", str(out)]


def _env() -> dict:
    # one intra-op thread: the machine's 2 cores are shared, and results must not depend on timing anyway
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::UserWarning"}


def _close(a, b, path="") -> None:
    """Recursive equality of two JSON values, numbers within 1e-6."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, nih_sample):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(nih_sample, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 180
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"training ended before its first checkpoint (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
    assert last.exists(), "no checkpoint within 180 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    state = runs.torch_load_safe(last)  # the atomic write never leaves a half-written checkpoint
    assert not state["training_done"] and not (killed / "metrics.json").exists()
    assert state["epoch"] == 0 and 0 < state["batch_in_epoch"] < 35, "killed mid-epoch"

    resumed = subprocess.run(_command(nih_sample, killed), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in (killed / "log.txt").read_text()
    straight = tmp_path / "straight"
    clean = subprocess.run(_command(nih_sample, straight), env=_env(), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "test split" in clean.stdout and "| Cardiomegaly |" in clean.stdout  # prints the final table

    timed = [json.loads((run / "metrics.json").read_text()) for run in (killed, straight)]
    for m in timed:
        assert m["run"].pop("train_seconds") >= 0  # wall-clock: the one field that differs
    _close(*timed)
    a = pd.read_csv(killed / "metrics.csv").drop(columns=["images_per_s", "seconds"])
    b = pd.read_csv(straight / "metrics.csv").drop(columns=["images_per_s", "seconds"])
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)
    assert len(a) == 2
    wa, wb = runs.load_weights(killed / "best.safetensors"), runs.load_weights(straight / "best.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    pa, pb = pd.read_csv(killed / "test_predictions.csv"), pd.read_csv(straight / "test_predictions.csv")
    pd.testing.assert_frame_equal(pa, pb, check_exact=False, atol=1e-6, rtol=0)
