"""What the training loop writes as it goes and reads back to resume (used by `common.train`).

`LoopState` (where training stands) and checkpoints/last.pt, the per-micro-batch seeds and the
global RNG states, log.txt (`RunLog`), metrics.csv, TensorBoard's event files (`TensorBoardLog`),
and the check that a rerun in the same folder is the same run (`common.pretrain` shares the
checkpoint and the check).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import random
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from common import distributed, runs
from common.distributed import DistInfo
from common.train_config import ADDED_KNOBS, TrainConfig

if TYPE_CHECKING:  # a type hint only
    from common.pretrain_config import PretrainConfig

__all__ = ["LoopState", "RunLog", "write_metrics_csv", "TensorBoardLog", "micro_seed",
           "rng_state", "set_rng_state", "save_checkpoint", "check_same_run", "RESUMABLE_CHANGES"]

# Fields that may differ when resuming (how to run, not what to compute).
RESUMABLE_CHANGES = {"device", "num_workers", "progress", "eval_batch_size", "checkpoint_every",
                     "epochs", "max_steps", "patience", "n_boot", "out"}


@dataclass
class LoopState:
    """Where training stands: the top-level keys of checkpoints/last.pt, restored on resume."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # micro-batches of the current epoch trained and stepped
    step: int = 0  # optimiser steps taken
    loss_sum: float = 0.0  # the current epoch's train loss so far (rank 0 carries the sum over ranks)
    loss_count: int = 0  # ... over this many micro-batches
    best_score: float | None = None  # the best dev score so far (higher is better)
    best_metric: str | None = None  # what best_score measures: dev_mean_auroc, dev_loss or epoch
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    history: list[dict] = field(default_factory=list)  # metrics.csv's rows
    training_done: bool = False

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> LoopState:
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)})



class RunLog:
    """Print a line (above any progress bar) and append it to RUN_DIR/log.txt; silent off rank 0."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(msg)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"[{stamp}] {msg}\n")


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """metrics.csv: one row per scored epoch (LoopState.history), floats to 6 significant digits."""
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    runs.atomic_write_text(path, buf.getvalue())


# TensorBoard's event files, in the run folder itself: `tensorboard --logdir RUNS` names each run
# by its folder. Written beside metrics.csv, never read back by the suite.


class TensorBoardLog:
    """Each scored epoch as TensorBoard scalars, at its optimiser step: train and dev loss, dev mean
    AUROC and accuracy, dev AUROC per label, the learning rate (what metrics.csv holds, plus the
    labels). Rank 0 only. Needs the `tensorboard` package (requirements.txt); without it nothing
    is written and log.txt says so once. Writing consumes no random numbers: the run's weights and
    metrics are the same with or without it."""

    def __init__(self, out: Path, log, enabled: bool = True, resume_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: imports the tensorboard package
        except ImportError as err:
            log(f"no TensorBoard event files ({err}; pip install tensorboard)")
            return
        if resume_step is None:  # a fresh start: an earlier run's curves in this folder are not this run's
            for stale in out.glob(runs.TENSORBOARD_EVENTS):
                stale.unlink()
        # purge_step: points an interrupted run logged after its checkpoint are dropped, not doubled
        self.writer = SummaryWriter(str(out), purge_step=resume_step)

    def epoch(self, row: dict, dev_auroc: dict | None) -> None:
        """One metrics.csv row (LoopState.history) and the dev AUROC per label of the same epoch."""
        if self.writer is None:
            return
        step = int(row["step"])
        for tag, key in (("loss/train", "train_loss"), ("loss/dev", "dev_loss"), ("dev/mean_auroc", "dev_mean_auroc"),
                         ("dev/mean_accuracy", "dev_mean_accuracy"), ("lr", "lr")):
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], step)
        for label, value in (dev_auroc or {}).items():
            if value is not None:
                self.writer.add_scalar(f"dev_auroc/{label}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def micro_seed(seed: int, epoch: int, micro: int, rank: int) -> int:
    """The seed of one training micro-batch: what makes a resumed run replay an interrupted one exactly."""
    return int(np.random.SeedSequence([seed, epoch, micro, rank]).generate_state(1, np.uint64)[0] >> 1)


def rng_state() -> dict:
    """The torch, numpy, Python (and CUDA) global RNG states, as plain containers torch.load accepts."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_same_run(saved: dict, cfg: TrainConfig | PretrainConfig, where: Path,
                   resumable: Container[str] = RESUMABLE_CHANGES, added: Mapping[str, Any] = ADDED_KNOBS,
                   what: str = "run") -> list[str]:
    """Raise when `cfg` would compute a different run than the one in `where`; list allowed changes.

    `resumable`: the fields that may differ (how to run, not what to compute); `added`: the values
    of knobs added since a run was saved, as that run used them; `what` names the run in the error.
    """
    now = cfg.asdict()
    saved = {**added, **saved}  # a knob added after the run was saved: what the run did
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if ("split_fractions" in changed and "split_fractions" in now
            and list(saved.get("split_fractions", [])) == list(now["split_fractions"])):
        changed.remove("split_fractions")  # a tuple read back from JSON is a list
    blocking = [k for k in changed if k not in resumable]
    if blocking:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in blocking)
        raise ValueError(f"{where}: holds a {what} with different settings ({detail}). Resume it with the same "
                         "settings, or give a new --out for a new run.")
    return [k for k in changed if k != "out"]


def save_checkpoint(path: Path, info: DistInfo, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: dict, config: dict, init: dict | None, state: LoopState,
                    ema: torch.nn.Module | None = None, **extra: Any) -> None:
    """checkpoints/last.pt (rank 0; every rank waits): the weights, optimiser, schedule, RNG states,
    the configuration, `extra` (a caller's own top-level keys, e.g. pretraining's "method"), the
    loop state (its fields as top-level keys) and the weights' moving average when the run keeps one."""
    if info.is_main:
        fields = {f.name for f in dataclasses.fields(state)}
        clash = set(extra) & ({"model", "optimizer", "scheduler", "rng", "config", "init", "ema"} | fields)
        if clash:
            raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} would overwrite the checkpoint's own")
        runs.atomic_torch_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler,
            "rng": rng_state(), "config": config, "init": init, **extra, **dataclasses.asdict(state),
            **({"ema": ema.state_dict()} if ema is not None else {}),
        }, path)
    distributed.barrier(info)
