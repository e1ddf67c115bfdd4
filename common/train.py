"""The training engine: `fit(TrainConfig) -> run directory`, on CPU, one GPU or many via torchrun.

    from common.train import TrainConfig, fit
    run_dir = fit(TrainConfig(data=["dataset_full"], task="all14", model_name="efficientnet_b0",
                              out="runs/all14"))

What a run does, top to bottom (`fit`):
  1. data: `load_dataset` each folder (none given: `default_data_dirs()`), `combine`, keep the task's
     rows (`select_task`), `patient_split(seed)`, decode once into the uint8 cache
     (`ImageCache(image_size)`); unreadable files are dropped and listed in RUN_DIR/unreadable.csv.
  2. model: `build_model` (any timm name), optionally `init_from` an earlier run (stage 1 -> 2) and
     `freeze` the first K stages; config.json records everything needed to rebuild it.
  3. loop: AdamW, linear warmup then cosine decay per optimiser step, gradient accumulation, BCE
     masked where a label is NaN, bf16 autocast + channels_last on CUDA; the dev split is scored
     each epoch (metrics.csv); best.safetensors keeps the best dev mean AUROC (dev loss when the
     AUROC is undefined); early stopping; `max_steps` for smoke runs.
  4. end: best weights predict the test split -> test_predictions.csv, thresholds tuned on dev ->
     thresholds.json, metrics.json (test metrics + "dev" + "run"), roc.png.

Resume: rerunning with the same `out` continues from checkpoints/last.pt (written at each epoch's
end and every `checkpoint_every` optimiser steps). Data order is a function of (seed, epoch), and
the global RNG (dropout) and augmentation are reseeded from (seed, epoch, micro-batch, rank) before
each micro-batch, so a run killed anywhere replays exactly: a resumed run ends with the same
metrics as an uninterrupted one. A run that already finished just returns its directory.

Distributed: the same `fit` under `torchrun --nproc_per_node=N -m common train ...` (see
`common.distributed` for multi-node rendezvous): DistributedSampler, DDP, dev/test predictions
gathered across ranks and de-duplicated, logs / progress / checkpoints on rank 0 only.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

import common
from common import distributed, runs
from common.distributed import DistInfo
from common.data import select_task
from common.predict import sigmoid
from common.train_config import TrainConfig

__all__ = [
    "TrainConfig", "fit", "prepare_data", "PreparedData", "select_task", "masked_bce",
    "WarmupCosine", "BatchTransform", "ResumableSampler", "model_kwargs", "FitHooks",
]

UNREADABLE_CSV = "unreadable.csv"
ROC_PNG = "roc.png"
# Files one run writes; a fresh start in an existing folder removes stale ones first.
_RUN_OUTPUTS = (runs.METRICS_CSV, runs.BEST, runs.THRESHOLDS, runs.METRICS_JSON, runs.TEST_PREDICTIONS,
                ROC_PNG, UNREADABLE_CSV)
# Fields that may differ when resuming (how to run, not what to compute).
_RESUMABLE_CHANGES = {"device", "num_workers", "progress", "eval_batch_size", "checkpoint_every",
                      "epochs", "max_steps", "patience", "n_boot", "out"}


# --------------------------------------------------------------------------------------------
# data


@dataclass
class PreparedData:
    """The task's images and labels, split by patient, decoded into the cache."""

    frame: pd.DataFrame  # selected rows (image_id, path, patient_id, source, labels, split, ok)
    labels: list[str]  # output order
    y: np.ndarray  # (N, L) float32, 1 / 0 / NaN
    images: Any  # (N, S, S) uint8 memmap aligned with frame
    split_index: dict[str, np.ndarray]  # 'train' / 'dev' / 'test' -> row indices of readable images
    datasets: list[dict]  # per dataset: root, layout, images, patients, synthetic
    synthetic: bool
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def prepare_data(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> PreparedData:
    """Steps 1 of `fit`: datasets -> task rows -> patient split -> decoded cache."""
    from common.cache import ImageCache
    from common.data import combine, load_dataset, task_split

    if cfg.data:
        roots = [Path(p) for p in cfg.data]
    else:
        from common.data import default_data_dirs

        roots, default_synthetic = default_data_dirs()
        log(f"data: no --data given; using {'the SYNTHETIC default ' if default_synthetic else ''}"
            f"{', '.join(str(r) for r in roots)}")
    sets = [load_dataset(r) for r in roots]
    infos = []
    for ds in sets:
        f = ds.frame
        infos.append({"root": str(ds.root), "layout": ds.layout, "images": int(len(f)),
                      "patients": int(f["patient_id"].nunique()), "rows_without_image": int(ds.rows_without_image),
                      "synthetic": bool(getattr(ds, "is_synthetic", False))})
        log(f"data: {ds.root} ({ds.layout} layout{', SYNTHETIC' if infos[-1]['synthetic'] else ''}): "
            f"{len(f)} images, {infos[-1]['patients']} patients, {ds.rows_without_image} rows without an image")
    data = combine(sets)
    frame, labels = task_split(data.frame, cfg.task, seed=cfg.seed, fractions=cfg.split_fractions)
    log(f"task {cfg.task}: {len(frame)} of {len(data.frame)} images kept, outputs {labels}")
    if not len(frame):
        raise ValueError(f"task {cfg.task!r}: no image in {[str(r) for r in roots]} has a known label for "
                         f"{labels}; check the dataset folders or choose another --task")
    cached = ImageCache(cfg.image_size).load(frame["path"].tolist(), progress=progress)
    ok = np.asarray(cached.ok, dtype=bool)
    frame["ok"] = ok
    unreadable = [(str(p), str(r)) for p, r in cached.unreadable]
    if unreadable:
        log(f"images: {len(unreadable)} unreadable file(s) skipped (listed in {UNREADABLE_CSV})")
    split_index = {s: np.flatnonzero(ok & (frame["split"].to_numpy() == s)) for s in ("train", "dev", "test")}
    counts = {s: len(i) for s, i in split_index.items()}
    log("split by patient (seed {}): train {train} / dev {dev} / test {test} images".format(cfg.seed, **counts))
    y = frame[labels].to_numpy(dtype=np.float32)
    return PreparedData(frame=frame, labels=labels, y=y, images=cached.images, split_index=split_index,
                        datasets=infos, synthetic=any(i["synthetic"] for i in infos), unreadable=unreadable)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded, `set_epoch`) that can skip the first `start` indices of an epoch.

    Works without a process group (num_replicas=1, rank=0). Skipping lets a run resumed from a
    mid-epoch checkpoint see exactly the batches the interrupted run had not seen yet.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


class BatchTransform:
    """uint8 [B,1,S,S] batch -> normalised float [B,C,S,S] on the device (augmented when given a generator).

    The same arithmetic as `common.preprocess.to_model_input` (x/255, repeat, (x-mean)/std), done
    per batch on the device, so a cached uint8 batch costs almost nothing to move.
    """

    def __init__(self, input_cfg: dict, device: torch.device, channels_last: bool = False, degrees: float = 20.0):
        c = int(input_cfg["in_chans"])
        mean = np.resize(np.asarray(input_cfg["mean"], dtype=np.float32)[:c], c)
        std = np.resize(np.asarray(input_cfg["std"], dtype=np.float32)[:c], c)
        self.in_chans = c
        self.mean = torch.from_numpy(mean).view(1, c, 1, 1).to(device)
        self.std = torch.from_numpy(std).view(1, c, 1, 1).to(device)
        self.device = device
        self.channels_last = channels_last
        self.degrees = degrees

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        if generator is not None:
            from common.cache import random_affine_batch

            # augment the single grey channel before repeating it: C times less work
            x = random_affine_batch(x, generator, degrees=self.degrees)
        x = x.expand(-1, self.in_chans, -1, -1)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the known (non-NaN) targets only.

    A NaN target contributes nothing, not even gradient: an image labelled only for Cardiomegaly
    teaches only the Cardiomegaly output.
    """
    known = ~torch.isnan(targets)
    t = torch.where(known, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(logits.float(), t, weight=known.float(), pos_weight=pos_weight,
                                              reduction="sum")
    return loss / known.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# optimisation


class WarmupCosine:
    """Learning-rate multiplier per optimiser step: linear warmup, then cosine decay to `min_ratio`."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {"name": "warmup_cosine", "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_ratio": self.min_ratio}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # decay weight matrices and kernels only; biases and norm scales are not regularised (nanoGPT)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _pos_weight(y: np.ndarray) -> np.ndarray:
    pos = np.nansum(y == 1, axis=0).astype(np.float64)
    neg = np.nansum(y == 0, axis=0).astype(np.float64)
    # neg/pos, capped so a label with one positive cannot dominate the loss
    return np.clip(neg / np.maximum(pos, 1.0), 1e-3, 1000.0).astype(np.float32)


def _micro_seed(seed: int, epoch: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, micro, rank]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------
# model


def model_kwargs(cfg: TrainConfig, num_labels: int) -> dict:
    """The `build_model` kwargs (minus `pretrained`): config.json["model"]."""
    return {"model_name": cfg.model_name, "num_labels": num_labels, "head": cfg.head, "in_chans": cfg.in_chans,
            "image_size": cfg.image_size, "head_dropout": cfg.head_dropout}


def _input_config(model: torch.nn.Module, image_size: int) -> dict:
    from common.models import model_input_config

    ic = dict(model_input_config(model, image_size=image_size))
    return {"image_size": int(ic["image_size"]), "mean": [float(v) for v in ic["mean"]],
            "std": [float(v) for v in ic["std"]], "in_chans": int(ic["in_chans"])}


# --------------------------------------------------------------------------------------------
# logging and run files


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


def _write_metrics_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    runs.atomic_write_text(path, buf.getvalue())


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_same_run(saved: dict, cfg: TrainConfig, where: Path) -> list[str]:
    """Raise when `cfg` would compute a different run than the one in `where`; list allowed changes."""
    now = cfg.asdict()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if any(k == "split_fractions" for k in changed) and list(saved.get("split_fractions", [])) == list(now["split_fractions"]):
        changed.remove("split_fractions")  # a tuple read back from JSON is a list
    blocking = [k for k in changed if k not in _RESUMABLE_CHANGES]
    if blocking:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in blocking)
        raise ValueError(f"{where}: holds a run with different settings ({detail}). Resume it with the same "
                         "settings, or give a new --out for a new run.")
    return [k for k in changed if k != "out"]


# --------------------------------------------------------------------------------------------
# prediction


@dataclass
class _Split:
    name: str
    rows: np.ndarray  # row indices into PreparedData
    loader: DataLoader | None
    positions: list[int]  # this rank's positions within `rows`, in loader order


def _eval_split(name: str, rows: np.ndarray, dataset, cfg: TrainConfig, info: DistInfo, pin: bool) -> _Split:
    if not len(rows):
        return _Split(name, rows, None, [])
    subset = Subset(dataset, rows.tolist())
    sampler = ResumableSampler(subset, num_replicas=info.world_size, rank=info.rank, shuffle=False, seed=cfg.seed)
    loader = DataLoader(subset, batch_size=cfg.eval_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=pin, persistent_workers=False)
    return _Split(name, rows, loader, list(iter(sampler)))


@torch.no_grad()
def _predict(model: torch.nn.Module, split: _Split, transform: BatchTransform, amp: contextlib.AbstractContextManager,
             info: DistInfo, show: bool) -> np.ndarray:
    """Logits (len(rows), L) for a split, gathered from every rank, each image exactly once."""
    model.eval()
    chunks = []
    if split.loader is not None:
        for x, _ in tqdm(split.loader, desc=f"predict {split.name}", leave=False, disable=not show):
            with amp:
                chunks.append(model(transform(x)).float().cpu())
    logits = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
    parts = distributed.all_gather_objects(info, (split.positions, logits))
    # DistributedSampler pads by repeating images; keep the first prediction of each position
    pos = np.concatenate([np.asarray(p, dtype=np.int64) for p, _ in parts]) if parts else np.zeros(0, np.int64)
    width = max((lg.shape[1] for _, lg in parts if lg.size), default=0)
    allv = np.concatenate([lg for _, lg in parts if lg.size]) if width else np.zeros((0, 0), np.float32)
    uniq, first = np.unique(pos, return_index=True)
    if len(uniq) != len(split.rows):
        raise RuntimeError(f"{split.name}: gathered predictions for {len(uniq)} of {len(split.rows)} images")
    return allv[first]


def _dev_scores(logits: np.ndarray, y: np.ndarray, labels: list[str]) -> dict:
    from common.metrics import per_label_accuracy, per_label_auroc

    loss = float(masked_bce(torch.from_numpy(logits), torch.from_numpy(y))) if len(y) else None
    prob = sigmoid(logits)
    auroc = per_label_auroc(y, prob, labels)
    acc = per_label_accuracy(y, prob, labels)
    defined = [v for v in auroc.values() if v is not None]
    accs = [v for v in acc.values() if v is not None]
    return {"loss": loss, "mean_auroc": float(np.mean(defined)) if defined else None,
            "mean_accuracy": float(np.mean(accs)) if accs else None}


# --------------------------------------------------------------------------------------------
# fit


@dataclass
class FitHooks:
    """Extension points for methods built on `fit` (common.compress: pruning, distillation).

    Not saved with the run: a resumed run must be given the same hooks again.
    """

    # (model, log) -> dict | None, called once the model is built (after init_from, before freeze),
    # before it moves to the device and before a resumed checkpoint loads into it: load weights,
    # register gradient hooks. A returned dict becomes config.json["init"] on a fresh start.
    on_model: Callable[[torch.nn.Module, Callable[[str], None]], dict | None] | None = None
    # (masked_bce_loss, logits, targets, inputs) -> the loss to minimise, per training micro-batch
    # (inputs: the normalised, augmented batch the model saw). Dev/test scoring is unchanged.
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def fit(config: TrainConfig | dict, hooks: FitHooks | None = None) -> Path:
    """Train per `config`; return the complete run directory (see `common.runs`).

    Resumes from `out/checkpoints/last.pt` when present; returns at once when that run finished.
    Under torchrun (WORLD_SIZE > 1) joins the process group and trains with DDP.
    `hooks`: see `FitHooks` (used by pruning and distillation; None for a plain run).
    """
    cfg = (config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)).validate()
    info, device = distributed.setup(cfg.device)
    try:
        return _fit(cfg, info, device, hooks or FitHooks())
    finally:
        distributed.cleanup(info)


def _fit(cfg: TrainConfig, info: DistInfo, device: torch.device, hooks: FitHooks | None = None) -> Path:
    from common.models import build_model, freeze, init_from

    hooks = hooks or FitHooks()

    out = Path(cfg.out)
    log = RunLog(out / runs.LOG, enabled=info.is_main)
    show = info.is_main and cfg.progress

    # ---- resume or fresh start
    ckpt = runs.torch_load_safe(out / runs.LAST) if (out / runs.LAST).is_file() else None
    if ckpt is None and (out / runs.METRICS_JSON).is_file() and (out / runs.CONFIG).is_file():
        _check_same_run(runs.read_config(out).get("train", {}), cfg, out)
        log(f"{out}: finished run (metrics.json present, no checkpoint); nothing to do")
        return out
    if ckpt is not None:
        changes = _check_same_run(ckpt["config"], cfg, out)
        if ckpt["training_done"] and (out / runs.METRICS_JSON).is_file():
            log(f"{out}: run already finished; nothing to do")
            return out
        log(f"resuming {out} from {runs.LAST}: epoch {ckpt['epoch'] + 1}, micro-batch {ckpt['batch_in_epoch']}, "
            f"step {ckpt['step']}" + (f" (changed: {', '.join(changes)})" if changes else ""))
    else:
        if info.is_main:
            for name in _RUN_OUTPUTS:
                (out / name).unlink(missing_ok=True)
        distributed.barrier(info)
        log(f"new run in {out} ({info.world_size} process{'es' if info.world_size > 1 else ''}, device {device})")

    # ---- data (one process per node fills the cache first; the others then read it)
    if info.local_rank == 0:
        data = prepare_data(cfg, log=log, progress=show)
    distributed.barrier(info)
    if info.local_rank != 0:
        data = prepare_data(cfg, log=log, progress=False)
    if info.is_main and data.unreadable:
        table = pd.DataFrame(data.unreadable, columns=["path", "reason"])
        runs.atomic_write_text(out / UNREADABLE_CSV, table.to_csv(index=False))
    labels = data.labels
    train_rows = data.split_index["train"]
    if not len(train_rows):
        raise ValueError(f"{out}: the train split is empty ({len(data.frame)} images in total); add data")

    # ---- model
    torch.manual_seed(cfg.seed)  # random init is a function of the seed
    mkw = model_kwargs(cfg, len(labels))
    init_info: dict | None = None
    if ckpt is not None:
        model = build_model(**mkw, pretrained=False)  # weights come from the checkpoint
        init_info = ckpt.get("init")
    else:
        model = build_model(**mkw, pretrained=cfg.pretrained if cfg.init_from is None else False)
        if cfg.init_from is not None:
            if cfg.pretrained:
                log("init_from given: the backbone comes from it, so --pretrained is not loaded")
            res = init_from(model, cfg.init_from)
            init_info = {"source": str(cfg.init_from), **{k: list(res[k]) for k in ("kept", "dropped", "new")}}
            log(f"init_from {cfg.init_from}: kept {len(res['kept'])} keys, dropped {len(res['dropped'])}"
                f" ({_summarise(res['dropped'])}), new {len(res['new'])} ({_summarise(res['new'])})")
    if hooks.on_model is not None:
        hooked = hooks.on_model(model, log)
        if ckpt is None and hooked is not None:
            init_info = hooked
    if ckpt is None and cfg.init_from is None and not cfg.pretrained and hooks.on_model is None:
        log("random initialisation (no --pretrained, no --init-from): expect results far below published ones")
    frozen = freeze(model, cfg.freeze) if cfg.freeze else []
    if frozen:
        log(f"freeze {cfg.freeze}: {len(frozen)} group(s) frozen: {_summarise(frozen)}")
    input_cfg = _input_config(model, cfg.image_size)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model {cfg.model_name} ({cfg.head} head, {len(labels)} output{'s' if len(labels) > 1 else ''}): "
        f"{n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; input {input_cfg}")

    if info.is_main and (ckpt is None or not (out / runs.CONFIG).is_file()):
        runs.save_json(out / runs.CONFIG, {
            "model": mkw, "labels": labels, "input": input_cfg, "train": cfg.asdict(), "data": data.datasets,
            "synthetic": data.synthetic, "init": init_info, "frozen": frozen,
            "split": {s: int(len(i)) for s, i in data.split_index.items()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": common.__version__,
        })

    cuda = device.type == "cuda"
    channels_last = cuda and cfg.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw_model, device_ids=[device.index] if cuda else None)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.bf16 else contextlib.nullcontext())

    # ---- loaders
    from common.cache import XrayTensorDataset

    dataset = XrayTensorDataset(data.images, data.y)
    train_set = Subset(dataset, train_rows.tolist())
    sampler = ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    per_rank = len(sampler)
    # full batches only when there are enough images: a last batch of 1 breaks BatchNorm
    drop_last = per_rank >= cfg.batch_size
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                              num_workers=cfg.num_workers, pin_memory=cuda, persistent_workers=cfg.num_workers > 0,
                              generator=torch.Generator())  # own generator: the global RNG stays untouched
    n_micro = len(train_loader)
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = min(cfg.warmup_steps, total_steps // 5)
    if warmup < cfg.warmup_steps:
        log(f"warmup_steps {cfg.warmup_steps} is more than 20% of the run's {total_steps} steps: using {warmup}")
    schedule = WarmupCosine(warmup, total_steps, cfg.min_lr_ratio)
    dev = _eval_split("dev", data.split_index["dev"], dataset, cfg, info, cuda)
    test = _eval_split("test", data.split_index["test"], dataset, cfg, info, cuda)
    transform = BatchTransform(input_cfg, device, channels_last=channels_last, degrees=cfg.rotate_degrees)
    pos_weight = None
    if cfg.pos_weight:
        pw = _pos_weight(data.y[train_rows])
        pos_weight = torch.from_numpy(pw).to(device)
        log("pos_weight (neg/pos on train): " + ", ".join(f"{n} {w:.2f}" for n, w in zip(labels, pw)))

    optimizer = torch.optim.AdamW(_param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, fused=cuda or None)
    state: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "loss_sum": 0.0, "loss_count": 0,
                             "best_score": None, "best_metric": None, "best_epoch": None, "bad_epochs": 0,
                             "history": [], "training_done": False}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        state.update({k: ckpt[k] for k in state})
        if not info.is_main:
            state.update(loss_sum=0.0, loss_count=0)  # rank 0's checkpoint carries the epoch's partial sum
        if ckpt["scheduler"].get("total_steps") != schedule.total_steps:
            log(f"the schedule now ends at step {schedule.total_steps} (was {ckpt['scheduler'].get('total_steps')})")
        del ckpt  # free the host copy of the weights

    def save_checkpoint() -> None:
        if info.is_main:
            runs.atomic_torch_save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": {**schedule.state_dict(), "step": state["step"]}, "rng": _rng_state(),
                "config": cfg.asdict(), "init": init_info, **state,
            }, out / runs.LAST)
        distributed.barrier(info)

    def end_epoch(epoch: int, seconds: float, images: int) -> bool:
        """Score dev after `epoch` (1-based; 0 = the initial weights), keep the best weights and
        write metrics.csv; True = stop early."""
        train_loss = None
        if state["loss_count"]:
            s, n = distributed.all_reduce_sum(info, [state["loss_sum"], state["loss_count"]], device)
            train_loss = s / n
        scores = _dev_scores(_predict(raw_model, dev, transform, amp, info, show), data.y[dev.rows], labels) \
            if len(dev.rows) else {"loss": None, "mean_auroc": None, "mean_accuracy": None}
        if scores["mean_auroc"] is not None:
            metric, score = "dev_mean_auroc", scores["mean_auroc"]
        elif scores["loss"] is not None:
            metric, score = "dev_loss", -scores["loss"]
        else:
            metric, score = "epoch", float(epoch)  # no dev split: the latest epoch is the best one
        if state["best_metric"] not in (None, metric):
            state["best_score"] = None  # the dev AUROC became (un)defined: compare like with like
        improved = state["best_score"] is None or score > state["best_score"]
        if improved:
            state.update(best_score=score, best_metric=metric, best_epoch=epoch, bad_epochs=0)
            if info.is_main:
                runs.save_weights(raw_model.state_dict(), out / runs.BEST)
        else:
            state["bad_epochs"] += 1
        lr = optimizer.param_groups[0]["lr"]
        state["history"].append({
            "epoch": epoch, "step": state["step"], "train_loss": train_loss, "dev_loss": scores["loss"],
            "dev_mean_auroc": scores["mean_auroc"], "dev_mean_accuracy": scores["mean_accuracy"], "lr": lr,
            "images_per_s": round(images / seconds, 2) if seconds > 0 and images else None, "best": improved,
        })
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        log(f"epoch {epoch}/{cfg.epochs}: step {state['step']}, train loss {fmt(train_loss)}, dev loss {fmt(scores['loss'])}, "
            f"dev mean AUROC {fmt(scores['mean_auroc'])}, dev mean accuracy {fmt(scores['mean_accuracy'])}"
            + (" (best)" if improved else f" (no better for {state['bad_epochs']} epoch(s))"))
        if info.is_main:
            _write_metrics_csv(out / runs.METRICS_CSV, state["history"])
        stop = cfg.patience > 0 and state["bad_epochs"] >= cfg.patience
        if stop:
            log(f"early stop: dev {metric} not better for {cfg.patience} epochs (best epoch {state['best_epoch']})")
        return stop

    # ---- loop
    if cfg.max_steps == 0 and not state["training_done"]:
        log("max_steps=0: scoring the initial weights only")
        end_epoch(0, 0.0, 0)
        state["training_done"] = True
        save_checkpoint()
    max_steps = cfg.max_steps if cfg.max_steps is not None else float("inf")
    while not state["training_done"]:
        epoch = state["epoch"]
        if epoch >= cfg.epochs or state["step"] >= max_steps:
            state["training_done"] = True
            save_checkpoint()
            break
        model.train()
        sampler.set_epoch(epoch)
        first = state["batch_in_epoch"]
        sampler.start = first * cfg.batch_size
        started, images = time.perf_counter(), 0
        loss_acc = torch.zeros((), device=device)  # device-side sum: no sync per micro-batch
        bar = tqdm(total=n_micro, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show,
                   dynamic_ncols=True)
        micro = first
        hit_max = False
        for x, y in train_loader:
            group_start = (micro // cfg.grad_accum) * cfg.grad_accum
            group_size = min(cfg.grad_accum, n_micro - group_start)
            sync_now = micro + 1 - group_start == group_size
            seed = _micro_seed(cfg.seed, epoch, micro, info.rank)
            torch.manual_seed(seed)  # dropout and anything else random: a function of (seed, epoch, micro, rank)
            gen = torch.Generator(device="cpu").manual_seed(seed) if cfg.augment else None
            inputs = transform(x, gen)
            targets = y.to(device, non_blocking=True)
            no_sync = model.no_sync() if info.enabled and not sync_now else contextlib.nullcontext()
            with no_sync:
                with amp:
                    logits = model(inputs)
                loss = masked_bce(logits, targets, pos_weight)
                if hooks.loss is not None:
                    loss = hooks.loss(loss, logits, targets, inputs)
                (loss / group_size).backward()
            loss_acc += loss.detach()
            micro += 1
            images += len(x)
            bar.update(1)
            if not sync_now:
                continue
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * schedule(state["step"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch_in_epoch"] = micro
            if micro % 10 == 0 or micro == n_micro:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            hit_max = state["step"] >= max_steps
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and micro < n_micro and not hit_max:
                done = loss_acc.item()
                loss_acc.zero_()
                s, n = distributed.all_reduce_sum(info, [done, micro - first], device)
                # rank 0 carries the whole epoch's partial sum, the others restart from zero
                state["loss_sum"] += s if info.is_main else 0.0
                state["loss_count"] += int(n) if info.is_main else 0
                first = micro
                save_checkpoint()
            if hit_max:
                break
        bar.close()
        state["loss_sum"] += loss_acc.item()
        state["loss_count"] += micro - first
        stop = end_epoch(epoch + 1, time.perf_counter() - started, images * info.world_size)
        state.update(epoch=epoch + 1, batch_in_epoch=0, loss_sum=0.0, loss_count=0)
        if stop or hit_max:
            if hit_max:
                log(f"max_steps={cfg.max_steps} reached")
            state["training_done"] = True
        save_checkpoint()

    # ---- final: best weights -> dev thresholds, test predictions and metrics
    return _finish(cfg, out, log, info, data, raw_model, transform, amp, dev, test, state, show)


def _summarise(names: Sequence[str], limit: int = 4) -> str:
    names = list(names)
    if not names:
        return "none"
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _finish(cfg: TrainConfig, out: Path, log: RunLog, info: DistInfo, data: PreparedData, raw_model: torch.nn.Module,
            transform: BatchTransform, amp, dev: _Split, test: _Split, state: dict, show: bool) -> Path:
    from common.metrics import evaluate_predictions, format_table, plot_roc, tune_thresholds

    labels = data.labels
    raw_model.load_state_dict(runs.load_weights(out / runs.BEST))
    log(f"best epoch {state['best_epoch']} by {state['best_metric']}; predicting dev and test with its weights")
    dev_prob = sigmoid(_predict(raw_model, dev, transform, amp, info, show)) if len(dev.rows) else None
    test_prob = sigmoid(_predict(raw_model, test, transform, amp, info, show)) if len(test.rows) else None
    if not info.is_main:
        distributed.barrier(info)
        return out
    y_dev, y_test = data.y[dev.rows], data.y[test.rows]
    if dev_prob is not None:
        thresholds = {k: float(v) for k, v in tune_thresholds(y_dev, dev_prob, labels).items()}
        dev_metrics = evaluate_predictions(y_dev, dev_prob, labels, thresholds=thresholds, n_boot=cfg.n_boot,
                                           seed=cfg.seed)
    else:
        log("dev split is empty: thresholds stay at 0.5")
        thresholds, dev_metrics = {n: 0.5 for n in labels}, None
    runs.save_json(out / runs.THRESHOLDS, thresholds)

    ids = data.frame["image_id"].to_numpy()
    pred = pd.DataFrame({"Image Index": ids[test.rows]})
    for j, name in enumerate(labels):
        pred[name] = test_prob[:, j] if test_prob is not None else np.zeros(0)
    runs.atomic_write_text(out / runs.TEST_PREDICTIONS, pred.to_csv(index=False, float_format="%.8g"))
    title = f"{cfg.model_name}, {cfg.task}: test ROC" + (" (SYNTHETIC data)" if data.synthetic else "")
    run_info = {
        "task": cfg.task, "model_name": cfg.model_name, "labels": labels, "synthetic": data.synthetic,
        "images": {s: int(len(i)) for s, i in data.split_index.items()}, "epochs_done": len(
            [h for h in state["history"] if h["train_loss"] is not None]),
        "steps": state["step"], "best_epoch": state["best_epoch"], "best_metric": state["best_metric"],
        "best_score": state["best_score"], "world_size": info.world_size,
    }
    if test_prob is not None:
        metrics = evaluate_predictions(y_test, test_prob, labels, thresholds=thresholds, n_boot=cfg.n_boot,
                                       seed=cfg.seed)
        fig = plot_roc(y_test, test_prob, labels, title=title)  # a Figure, no pyplot state
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        runs.atomic_write_bytes(out / ROC_PNG, buf.getvalue())
    else:
        log("test split is empty: test_predictions.csv has no rows and metrics.json no test metrics "
            "(add data, or change split_fractions)")
        metrics = {"n_images": 0, "labels": labels, "note": "test split empty: no test metrics"}
    metrics = {**metrics, "dev": dev_metrics, "run": run_info}
    runs.save_json(out / runs.METRICS_JSON, metrics)
    if test_prob is not None:
        log(("SYNTHETIC data: " if data.synthetic else "") + "test metrics\n" + format_table(metrics))
    log(f"run complete: {out}")
    distributed.barrier(info)
    return out
