"""What the training loop is fed and what it predicts: the prepared data, its samplers, the batch
transform, the dev/test predictions gathered across processes and the dev scores that pick the
best epoch (`common.train` re-exports the public ones it always had).

    data = prepare_data(cfg)                      # datasets -> task rows -> patient split -> uint8 cache
    transform = BatchTransform(input_cfg, device) # uint8 batch -> normalised (augmented) model input
    dev = eval_split("dev", data.split_index["dev"], dataset, cfg, info, pin=False)
    logits = predict_logits(model, dev, transform, amp, info, show=False)
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from common import distributed
from common.augment import random_affine_batch, random_intensity_batch
from common.cache import ImageCache
from common.data import combine, default_data_dirs, load_dataset, task_split
from common.distributed import DistInfo
from common.metrics import per_label_accuracy, per_label_auroc
from common.optim import masked_bce
from common.predict import sigmoid
from common.runs import UNREADABLE_CSV
from common.train_config import TrainConfig

__all__ = ["PreparedData", "prepare_data", "ResumableSampler", "BatchTransform", "EvalSplit", "eval_split",
           "predict_logits", "dev_scores"]


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


def _dataset_info(ds, log: Callable[[str], None]) -> dict:
    f = ds.frame
    info = {"root": str(ds.root), "layout": ds.layout, "images": int(len(f)),
            "patients": int(f["patient_id"].nunique()), "rows_without_image": int(ds.rows_without_image),
            "synthetic": bool(getattr(ds, "is_synthetic", False))}
    log(f"data: {ds.root} ({ds.layout} layout{', SYNTHETIC' if info['synthetic'] else ''}): "
        f"{len(f)} images, {info['patients']} patients, {ds.rows_without_image} rows without an image")
    return info


def prepare_data(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> PreparedData:
    """Step 1 of `fit`: datasets -> task rows -> patient split -> decoded cache."""
    if cfg.data:
        roots = [Path(p) for p in cfg.data]
    else:
        roots, default_synthetic = default_data_dirs()
        log(f"data: no --data given; using {'the SYNTHETIC default ' if default_synthetic else ''}"
            f"{', '.join(str(r) for r in roots)}")
    sets = [load_dataset(r) for r in roots]
    infos = [_dataset_info(ds, log) for ds in sets]
    data = combine(sets)
    frame, labels = task_split(data.frame, cfg.task, seed=cfg.seed, fractions=cfg.split_fractions,
                               folds=cfg.folds, fold=cfg.fold)
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
    how = f"fold {cfg.fold} of {cfg.folds} as test, seed {cfg.seed}" if cfg.folds else f"seed {cfg.seed}"
    log("split by patient ({}): train {train} / dev {dev} / test {test} images".format(how, **counts))
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

    def __init__(self, input_cfg: dict, device: torch.device, channels_last: bool = False, degrees: float = 20.0,
                 zoom: float = 0.1, translate: float = 0.05, intensity: float = 0.0):
        c = int(input_cfg["in_chans"])
        mean = np.resize(np.asarray(input_cfg["mean"], dtype=np.float32)[:c], c)
        std = np.resize(np.asarray(input_cfg["std"], dtype=np.float32)[:c], c)
        self.in_chans = c
        self.mean = torch.from_numpy(mean).view(1, c, 1, 1).to(device)
        self.std = torch.from_numpy(std).view(1, c, 1, 1).to(device)
        self.device = device
        self.channels_last = channels_last
        self.degrees = degrees
        self.zoom = zoom
        self.translate = translate
        self.intensity = intensity

    @classmethod
    def for_training(cls, input_cfg: dict, device: torch.device, cfg: TrainConfig,
                     channels_last: bool = False) -> BatchTransform:
        """The transform with a run's augmentation settings (`cfg.rotate_degrees`, zoom, ...)."""
        return cls(input_cfg, device, channels_last=channels_last, degrees=cfg.rotate_degrees, zoom=cfg.zoom,
                   translate=cfg.translate, intensity=cfg.intensity)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        if generator is not None:
            # augment the single grey channel before repeating it: C times less work
            x = random_affine_batch(x, generator, degrees=self.degrees, scale=(1 - self.zoom, 1 + self.zoom),
                                    translate=self.translate)
            x = random_intensity_batch(x, generator, self.intensity)
        x = x.expand(-1, self.in_chans, -1, -1)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


@dataclass
class EvalSplit:
    """A split the loop predicts (dev, test): its rows and this process's loader over them."""

    name: str
    rows: np.ndarray  # row indices into PreparedData
    loader: DataLoader | None
    positions: list[int]  # this rank's positions within `rows`, in loader order


def eval_split(name: str, rows: np.ndarray, dataset, cfg: TrainConfig, info: DistInfo, pin: bool) -> EvalSplit:
    """This process's share of a split, in order (DistributedSampler without shuffling)."""
    if not len(rows):
        return EvalSplit(name, rows, None, [])
    subset = Subset(dataset, rows.tolist())
    sampler = ResumableSampler(subset, num_replicas=info.world_size, rank=info.rank, shuffle=False, seed=cfg.seed)
    loader = DataLoader(subset, batch_size=cfg.eval_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=pin, persistent_workers=False)
    return EvalSplit(name, rows, loader, list(iter(sampler)))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, split: EvalSplit, transform: BatchTransform,
                   amp: contextlib.AbstractContextManager, info: DistInfo, show: bool) -> np.ndarray:
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


def dev_scores(logits: np.ndarray, y: np.ndarray, labels: list[str]) -> dict:
    """{"loss", "mean_auroc", "mean_accuracy", "auroc": {label: AUROC}} of dev logits (None where undefined)."""
    loss = float(masked_bce(torch.from_numpy(logits), torch.from_numpy(y))) if len(y) else None
    prob = sigmoid(logits)
    auroc = per_label_auroc(y, prob, labels)
    acc = per_label_accuracy(y, prob, labels)
    defined = [v for v in auroc.values() if v is not None]
    accs = [v for v in acc.values() if v is not None]
    return {"loss": loss, "mean_auroc": float(np.mean(defined)) if defined else None,
            "mean_accuracy": float(np.mean(accs)) if accs else None, "auroc": auroc}
