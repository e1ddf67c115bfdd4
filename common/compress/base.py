"""What every compression method shares: the derived run's training configuration, the
`compression.json` report each output folder carries, and the default log (stderr).

A pruned or distilled run is trained by `common.train.fit` from its source run's own
configuration, so it sees the same data and patient split and its test metrics compare like
with like.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import runs
from common.labels import TASKS, task_of
from common.train_config import TrainConfig

COMPRESSION_JSON = "compression.json"


def log_stderr(msg: str) -> None:
    """The default log of every compression step: progress goes to stderr, results to the caller."""
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class FineTune:
    """How a derived run (pruned, distilled) trains after its compression step, and what it writes.

    None keeps the source run's value (for `lr`, each method's own default). Further TrainConfig
    fields (batch_size, device, num_workers, progress, ...) go as keyword overrides beside it.
    """

    epochs: int | None = None
    max_steps: int | None = None  # 0: no training step, only scoring the compressed weights
    lr: float | None = None
    data: Sequence[str] | None = None  # the source's data folders, when they moved
    export: bool = True  # ONNX export into OUT/export when done
    log: Callable[[str], None] | None = None  # progress lines (default: stderr)

    @property
    def logger(self) -> Callable[[str], None]:
        return self.log or log_stderr


def source_train_config(run_dir: str | os.PathLike, out: str | os.PathLike, data: Sequence[str] | None = None,
                        **overrides) -> TrainConfig:
    """The TrainConfig of a derived run: the source run's own configuration, with `out` and overrides.

    Data, task, split seed and fractions stay the source's, so the derived run sees the same
    patient split and its test metrics compare like with like. A source made without `fit`
    (e.g. `common.predict.create_untrained_run`) gets its model and input from config.json and
    the default data (or `data`).
    """
    cfg = runs.read_config(run_dir)
    base = dict(cfg.get("train") or {})
    if not base:
        model = cfg["model"]
        labels = list(cfg["labels"])
        task = task_of(labels)
        if task is None:
            raise ValueError(f"{Path(run_dir) / runs.CONFIG}: outputs {labels} match no task {sorted(TASKS)}; "
                             "cannot derive a training configuration")
        base = {"task": task, "model_name": model["model_name"], "head": model.get("head", "mlp"),
                "head_dropout": model.get("head_dropout", 0.3), "in_chans": model.get("in_chans", 3),
                "image_size": int(cfg["input"]["image_size"])}
    if data is not None:
        base["data"] = [str(d) for d in data]
    # the derived run's weights come from the compression step, never from the hub or init_from
    base.update(pretrained=False, init_from=None, out=str(out))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(base)


def write_report(out: str | os.PathLike, report: dict) -> None:
    """Write `report` as OUT/compression.json (atomically)."""
    runs.save_json(Path(out) / COMPRESSION_JSON, report)


def read_report(path: str | os.PathLike) -> dict | None:
    """The `compression.json` of a compressed run or export folder (None when there is none)."""
    p = Path(path) / COMPRESSION_JSON
    return runs.load_json(p) if p.is_file() else None
