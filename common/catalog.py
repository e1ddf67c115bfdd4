"""Which trained models a front end can offer: run directories and stand-alone export folders.

    roots = model_roots(os.environ.get("MEDIMAGING_RUNS"))   # where to look
    for path in find_models(roots):                           # newest first
        print(describe_model(path))                           # "all14 - efficientnet_b0, 14 findings, ..."

A model is a run directory with weights (`common.runs.find_runs`) or an export folder
(`common.serving`'s layout) that is not its run's own `export/`. Torch-free: the app lists models
without importing it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common.paths import REPO_ROOT
from common.runs import CONFIG, find_runs
from common.serving import FP32, ONNX_META

DEFAULT_ROOTS = ("runs", "results")  # where `medimaging train` and `medimaging reproduce` write by default


def model_roots(spec: str | None = None) -> list[Path]:
    """Folders to search: `spec` (paths separated by the OS path separator, e.g. $MEDIMAGING_RUNS),
    else runs/ and results/ in the working directory and in the repository, each folder once."""
    if spec:
        return [Path(p) for p in spec.split(os.pathsep) if p]
    roots = [Path(name) for name in DEFAULT_ROOTS] + [REPO_ROOT / name for name in DEFAULT_ROOTS]
    unique: list[Path] = []
    for r in roots:
        if r.resolve() not in [u.resolve() for u in unique]:
            unique.append(r)
    return unique


def model_stamp(path: Path) -> float:
    """When a model was made: its config.json (run) or model.json (export) file's mtime.

    Not the folder's own mtime: exporting a run on first use adds a folder inside it, which
    would change the model's label (and a selection made by it) between two looks."""
    for name in (CONFIG, ONNX_META):
        if (path / name).is_file():
            return (path / name).stat().st_mtime
    return path.stat().st_mtime


def find_models(roots: list[Path]) -> list[Path]:
    """Run directories (with weights) and stand-alone export folders under roots, newest first."""
    found: dict[Path, float] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for run in find_runs(root):
            found[run.resolve()] = model_stamp(run)
        for meta in root.rglob(ONNX_META):
            folder = meta.parent.resolve()
            if (folder / FP32).is_file() and not (folder.parent / CONFIG).is_file():
                found[folder] = model_stamp(folder)
    return sorted(found, key=lambda p: -found[p])


def describe_model(path: Path) -> str:
    """One line naming a model: folder, backbone, number of findings, when made, SYNTHETIC data."""
    cfg = path / CONFIG
    meta = path / ONNX_META
    try:
        info = json.loads((cfg if cfg.is_file() else meta).read_text())
    except (OSError, ValueError):
        return path.name
    model = (info.get("model") or {}).get("model_name", "?")
    n = len(info.get("labels") or [])
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(model_stamp(path)))
    return f"{path.name} - {model}, {n} finding{'s' if n != 1 else ''}, {when}" + (
        " (SYNTHETIC data)" if info.get("synthetic") else "")
