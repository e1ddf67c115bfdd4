"""The run cache: where cached runs live, their key, when one is finished, and who trains it.

A run's folder is `RUNS/<task>-<model>-<key>`, where the key hashes its full training configuration
and the identity of its data (paths, layouts, image and patient counts, label-file contents); stage
2's configuration names stage 1's folder, so it includes stage 1's key. A compressed variant of a
run is `RUNS/<source run>--<method>-<key of its recipe>`. A finished run is reused, so re-running
after one notebook changed retrains only what changed; an interrupted one resumes from its last
checkpoint. One process trains a given run at a time (`run_lock`). `medimaging cache` reads this
module's `inventory`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common import runs as runfiles
from common.cache import file_lock
from common.compress.base import COMPRESSION_JSON
from common.experiments.datasets import dataset_identity, display_path
from common.experiments.notebooks import COMPRESSED_SEP, is_compressed, runs_dir
from common.pretrain_config import PRETRAIN_JSON
from common.serving import EXPORT_DIR, ONNX_META
from common.train_config import ADDED_KNOBS

# Fields of TrainConfig that say how to run, not what to compute: not part of a run's key.
_HOW_TO_RUN = ("out", "progress", "num_workers", "device", "eval_batch_size", "checkpoint_every")


def _source_identity(source: str) -> Any:
    """init_from / pretrained paths in a key: a run by its folder name (which holds its own key),
    a file by name, size and mtime."""
    p = Path(source)
    if p.is_dir() and (p / runfiles.CONFIG).is_file():
        return {"run": p.name}
    if p.is_file():
        st = p.stat()
        return {"file": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return source


def run_key(config) -> str:
    """12 hex digits naming a run: its training configuration and the identity of its data."""
    d = config.asdict()
    for k in _HOW_TO_RUN:
        d.pop(k, None)
    for k, neutral in ADDED_KNOBS.items():  # runs made before a knob existed keep their keys
        if d.get(k) == neutral:
            d.pop(k)
    if not config.data:
        raise ValueError("run_key: the configuration names no data folders (TrainConfig.data is empty)")
    d["data"] = [dataset_identity(p) for p in config.data]
    if d.get("init_from"):
        d["init_from"] = _source_identity(d["init_from"])
    if isinstance(d.get("pretrained"), str) and d["pretrained"] not in ("True", "False"):
        d["pretrained"] = _source_identity(d["pretrained"])
    return cache_key(d)


def cache_key(obj: Any, n: int = 12) -> str:
    """`n` hex digits of the sha256 of `obj` as sorted JSON: the one key of every cached run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# A compressed variant's key keeps the 10 digits it always had, so the compressed runs already in
# users' caches are still found.
COMPRESSED_KEY_DIGITS = 10


def compressed_run_dir(source: Path, method: str, params: Mapping[str, Any], runs_root: Path) -> Path:
    """Where the `method` variant of the run `source` with these recipe `params` is cached."""
    key = cache_key({"source": str(source), **params}, COMPRESSED_KEY_DIGITS)
    return runs_root / f"{source.name}{COMPRESSED_SEP}{method}-{key}"


def is_finished(run_dir: str | Path) -> bool:
    """Whether a cached run is done: its last file is written. A training ends with metrics.json,
    a pretraining with pretrain.json, a compressed variant (which may fine-tune first, writing metrics.json on the way) with its
    compression report and its ONNX export."""
    run_dir = Path(run_dir)
    if is_compressed(run_dir):
        return (run_dir / COMPRESSION_JSON).is_file() and (run_dir / EXPORT_DIR / ONNX_META).is_file()
    return (run_dir / runfiles.METRICS_JSON).is_file() or (run_dir / PRETRAIN_JSON).is_file()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


RUN_LOCK = ".lock"  # in each cached run folder: held while the run trains


def run_lock(run_dir: Path):
    """One process trains a given run at a time; a second one waits, then finds it finished."""
    return file_lock(run_dir / RUN_LOCK)


@dataclass
class RunRef:
    """One run as an experiment uses it."""

    role: str  # "stage 1", "stage 2", "ResNet-50", ...
    run_dir: Path
    requested_model: str  # the backbone the experiment names
    model_name: str  # what the profile trained for it
    reused: bool  # True: found finished in the cache, not trained now

    def metrics(self) -> dict:
        return runfiles.load_json(self.run_dir / runfiles.METRICS_JSON)

    def config(self) -> dict:
        return runfiles.read_config(self.run_dir)

    def history(self) -> pd.DataFrame:
        path = self.run_dir / runfiles.METRICS_CSV
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def model_label(self) -> str:
        if self.model_name == self.requested_model:
            return self.model_name
        return f"{self.model_name} (for {self.requested_model})"

    def to_dict(self) -> dict:
        return {"role": self.role, "run_dir": str(self.run_dir), "requested_model": self.requested_model,
                "model_name": self.model_name, "reused": self.reused}

    @classmethod
    def from_dict(cls, d: Mapping) -> RunRef:
        return cls(d["role"], Path(d["run_dir"]), d["requested_model"], d["model_name"], bool(d["reused"]))


def touch_used(run_dir: Path) -> None:
    """Mark a cached run as just used (its folder's mtime), so `medimaging cache clear --older-than`
    keeps what is still being reused. Nothing reads the folder's mtime as a run's identity."""
    try:
        os.utime(run_dir)
    except OSError:  # a read-only run cache is still usable
        pass


def reuse_or_make(run_dir: Path, make: Callable[[Path], object], what: str) -> bool:
    """Make `run_dir` with `make(run_dir)` unless it already finished; True when it was reused.

    Finished is checked again under the run's lock: of two processes asking at once, one makes the
    run while the other waits, then reuses it. An interrupted run is made again (`fit` resumes it).
    """
    if not is_finished(run_dir):
        with run_lock(run_dir):
            if not is_finished(run_dir):
                make(run_dir)
                return False
    print(f"{what}: reusing the finished run {display_path(run_dir)}", file=sys.stderr)
    touch_used(run_dir)
    return True


def cached_fit(config, role: str, requested_model: str, runs: str | Path | None = None) -> RunRef:
    """Train `config` into RUNS/<task>-<model>-<key>, or reuse that run when it already finished."""
    from common.train import fit  # torch: only when something is trained

    run_dir = runs_dir(runs) / f"{config.task}-{_slug(config.model_name)}-{run_key(config)}"

    def train(out: Path) -> None:
        print(f"{role}: training {config.model_name} ({config.task}) into {display_path(out)}", file=sys.stderr)
        fit(dataclasses.replace(config, out=str(out)))

    reused = reuse_or_make(run_dir, train, role)
    return RunRef(role, run_dir, requested_model, config.model_name, reused)



def cached_pretrain(config, role: str, runs: str | Path | None = None) -> Path:
    """Pretrain `config` (a `common.pretrain_config.PretrainConfig`) into RUNS/pretrain-<model>-<key>,
    or reuse that run when it already finished; its folder is an `init_from` source like a run's."""
    from common.pretrain import pretrain  # torch: only when something is pretrained

    d = {k: v for k, v in config.asdict().items() if k not in _HOW_TO_RUN}
    d["data"] = [dataset_identity(p) for p in config.data]
    run_dir = runs_dir(runs) / f"pretrain-{_slug(config.model_name)}-{cache_key(d)}"

    def make(out: Path) -> None:
        print(f"{role}: pretraining {config.model_name} into {display_path(out)}", file=sys.stderr)
        pretrain(dataclasses.replace(config, out=str(out)))

    reuse_or_make(run_dir, make, role)
    return run_dir
