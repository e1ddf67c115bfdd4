"""The run-directory contract: atomic writes and loading that cannot run code."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from common import runs


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "config.json"
    runs.save_json(target, {"a": 1})
    runs.save_json(target, {"a": 2, "b": [1, 2]})
    assert runs.load_json(target) == {"a": 2, "b": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["config.json"]


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "thresholds.json"
    runs.save_json(target, {"Effusion": 0.3})

    class Boom:
        pass

    with pytest.raises(TypeError):
        runs.save_json(target, {"bad": Boom()})
    assert runs.load_json(target) == {"Effusion": 0.3}
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]


def test_weights_round_trip_safetensors_and_torch(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    runs.save_weights(state, tmp_path / "best.safetensors")
    loaded = runs.load_weights(tmp_path / "best.safetensors")
    assert torch.equal(loaded["w"], state["w"])
    runs.atomic_torch_save({"model": state, "epoch": 3}, tmp_path / "checkpoints" / "last.pt")
    assert torch.equal(runs.load_weights(tmp_path / "checkpoints" / "last.pt")["b"], state["b"])
    # a folder resolves to the weights file inside it
    assert set(runs.load_weights(tmp_path)) == {"w", "b"}


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _RunsCode()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        runs.torch_load_safe(evil)


def test_missing_run_directory_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="medimaging train"):
        runs.read_config(tmp_path / "nope")


def test_package_import_does_not_import_torch():
    code = "import common, common.cli, common.preprocess, common.runs, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_atomic_writes_make_ordinary_files(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    runs.save_json(tmp_path / "metrics.json", {})
    mode = (tmp_path / "metrics.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "common", "--help"], capture_output=True, text=True, check=True)
    for name in ("data", "train", "evaluate", "predict", "explain", "export", "compress", "reproduce", "cache"):
        assert name in out.stdout
