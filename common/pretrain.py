"""Self-supervised pretraining on unlabelled images: `pretrain(PretrainConfig) -> run directory`.

    from common.pretrain import PretrainConfig, pretrain
    run_dir = pretrain(PretrainConfig(data=["dataset_full", "dataset_cardiomegaly"], out="runs/pretrain"))
    # then: medimaging train --init-from runs/pretrain --model resnet18 --in-chans 1 --image-size 128 ...

The study's "medical pretraining" step without labels: every image file below the given folders
is used (label files are not read: images without a label row, a test folder without labels, a
plain folder of PNGs all count). The method is SimSiam (Chen & He 2021), in `common.simsiam`:

    z = projector(backbone(view))        3-layer MLP with BatchNorm, proj_dim wide
    p = predictor(z)                     bottleneck MLP, pred_dim wide
    loss = -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2        in [-1, 1]; sg = stop-gradient

No negatives, no momentum encoder, no large batch: it fits a 2-core CPU and scales on GPUs
(DDP under torchrun, SyncBatchNorm on CUDA). A collapsed solution also reaches -1, so each epoch
logs `z_std`, the per-dimension std of the normalised projections times sqrt(proj_dim): about 1
while the representation spreads, 0 when it has collapsed (the paper's own check).

The two views (`common.simsiam.TwoViews`) are made on the device from the cached uint8 batch: random resized
crop and rotation in one `grid_sample`, a Gaussian blur, then gamma / contrast / brightness (the
training recipe's `common.augment.random_intensity_batch`), each view drawn independently; no
left-right flip unless asked.

The run folder is a `common.runs` run, so `medimaging train --init-from RUN` (and
`--pretrained RUN/best.safetensors`) reads it like a stage-1 run:

    RUN_DIR/
      config.json           "model" (model_name, in_chans, image_size), "labels": [] (no head),
                            "input" (image_size, mean, std, in_chans), "pretrain" (the config), "data"
      best.safetensors      the backbone, `backbone.*` names (a MedImagingModel without its head);
                            the latest epoch's: pretraining has no dev score to pick an epoch by
      checkpoints/last.pt   backbone + projector + predictor, optimiser, RNG, loop state: resume
      metrics.csv           per epoch: step, train_loss, z_std, lr, images_per_s, seconds, images
      steps.csv             per step: loss, z_std, lr (rank 0's batch under DDP)
      pretrain.json         the summary: images, epochs, steps, seconds, images/s, first and last loss
      loss.png              loss and z_std per step, with each epoch's mean
      log.txt, unreadable.csv, events.out.tfevents.*   as for a training run

Resume: rerunning with the same `out` continues from checkpoints/last.pt; data order and every
view are functions of (seed, epoch, step, rank), so a resumed run ends where an uninterrupted one
does. A finished run just returns its directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import common
from common import distributed, runs
from common.cache import ImageCache, XrayTensorDataset
from common.data import DatasetError, default_data_dirs, index_images
from common.distributed import DistInfo
from common.images import IMAGE_EXTENSIONS
from common.io import atomic_write_png
from common.models import build_model, model_input_config
from common.optim import WarmupCosine, param_groups
from common.pretrain_config import OPTIMIZERS, PRETRAIN_JSON, PretrainConfig
from common.simsiam import SimSiam, TwoViews, backbone_state, simsiam_loss, spread
from common.train_data import ResumableSampler
from common.train_state import (
    LoopState,
    RunLog,
    TensorBoardLog,
    check_same_run,
    micro_seed,
    save_checkpoint,
    set_rng_state,
    write_metrics_csv,
)

__all__ = ["PretrainConfig", "OPTIMIZERS", "PRETRAIN_JSON", "STEPS_CSV", "LOSS_PNG", "METHOD", "pretrain", "image_paths",
           "SimSiam", "simsiam_loss", "TwoViews", "backbone_state"]

METHOD = "simsiam"
STEPS_CSV = "steps.csv"  # every step's loss: the curve of a run too short for many epochs
LOSS_PNG = "loss.png"

# Files one pretraining run writes; a fresh start in an existing folder removes stale ones first.
_RUN_OUTPUTS = (runs.METRICS_CSV, STEPS_CSV, runs.BEST, PRETRAIN_JSON, LOSS_PNG, runs.UNREADABLE_CSV)


# --------------------------------------------------------------------------------------------
# data: every image file of the folders


def image_paths(dirs: list[str | Path]) -> tuple[list[str], list[dict]]:
    """(absolute paths of every image file below each folder, one {"root", "images"} per folder).

    Labels are not read: a folder of images with no label file is fine. A path listed twice (the
    same folder given twice, or nested) counts once. DatasetError for a missing folder, a file, or
    a folder without images.
    """
    seen: set[str] = set()
    paths: list[str] = []
    infos: list[dict] = []
    for d in dirs:
        root = Path(d).expanduser()
        if not root.exists():
            raise DatasetError(f"{root}: folder not found (--data takes a folder of images, any layout)")
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder (--data takes a folder of images, not a file)")
        found = sorted(index_images(root).values())
        if not found:
            raise DatasetError(f"{root.resolve()}: no image files below this folder "
                               f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        new = [p for p in found if p not in seen]
        seen.update(new)
        paths += new
        infos.append({"root": str(root.resolve()), "images": len(found)})
    return paths, infos


# --------------------------------------------------------------------------------------------
# the run


def pretrain(config: PretrainConfig | dict) -> Path:
    """Pretrain per `config`; return the run directory (see the module docstring).

    Resumes from `out/checkpoints/last.pt` when present; returns at once when that run finished.
    Under torchrun (WORLD_SIZE > 1) trains with DDP. DatasetError for a bad data folder.
    """
    cfg = (config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(config)).validate()
    info, device = distributed.setup(cfg.device)
    try:
        return _pretrain(cfg, info, device)
    finally:
        distributed.cleanup(info)


@dataclass
class _Partial:
    """What an epoch interrupted by a checkpoint has measured so far (saved in last.pt)."""

    seconds: float = 0.0
    images: int = 0
    spread_sum: float = 0.0


@dataclass
class _State(LoopState):
    """`LoopState` plus what pretraining keeps across a checkpoint: last.pt's "partial" and "step_log"."""

    partial: _Partial = field(default_factory=_Partial)
    step_log: list[dict] = field(default_factory=list)  # steps.csv: every step's loss, z_std and lr

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> _State:
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(LoopState)},
                   partial=_Partial(**ckpt.get("partial", {})), step_log=list(ckpt.get("step_log", [])))


@dataclass
class _Loop:
    """What the loop's steps share, set up once by `_setup_loop` and never reassigned."""

    cfg: PretrainConfig
    info: DistInfo
    device: torch.device
    out: Path
    log: RunLog
    show: bool  # progress bars (rank 0, cfg.progress)
    n_images: int  # readable images: config.json, last.pt, pretrain.json
    raw_model: SimSiam  # the model itself: what is saved
    model: nn.Module  # what trains on the batches: raw_model or its DDP wrapper
    amp: contextlib.AbstractContextManager
    views: TwoViews
    sampler: ResumableSampler
    loader: DataLoader
    n_steps: int  # steps in a whole epoch (len(loader) before a resume skips any)
    schedule: WarmupCosine
    peak_lr: float  # cfg.lr scaled by the global batch
    optimizer: torch.optim.Optimizer
    tensorboard: TensorBoardLog


def _pretrain(cfg: PretrainConfig, info: DistInfo, device: torch.device) -> Path:
    out = Path(cfg.out)
    log = RunLog(out / runs.LOG, enabled=info.is_main)
    show = info.is_main and cfg.progress
    started = time.perf_counter()
    # the folders first: a bad --data is an error before anything is written
    dirs, synthetic = ([Path(p) for p in cfg.data], False) if cfg.data else default_data_dirs()
    paths, folders = image_paths(dirs)

    finished, ckpt = _resume_or_start(cfg, out, log, info, device)
    if finished:
        return out
    images, rows = _load_data(cfg, out, log, info, show, dirs, synthetic, paths, folders)
    model, input_cfg = _build_model(cfg, log, resumed=ckpt is not None)
    if info.is_main and (ckpt is None or not (out / runs.CONFIG).is_file()):
        runs.save_json(out / runs.CONFIG, {
            "model": {"model_name": cfg.model_name, "in_chans": cfg.in_chans, "image_size": cfg.image_size},
            "labels": [],  # no head: a backbone for `medimaging train --init-from`, not a model to predict with
            "input": input_cfg, "method": METHOD, "pretrain": cfg.asdict(), "data": folders,
            "images": int(len(rows)),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": common.__version__,
        })

    loop = _setup_loop(cfg, info, device, out, log, show, model, input_cfg, images, rows, ckpt)
    state = _restore(loop, ckpt)
    del ckpt  # free the host copy of the weights
    try:
        _train(loop, state)
    finally:
        loop.tensorboard.close()
    if info.is_main:
        _finish(loop, state, time.perf_counter() - started)
    distributed.barrier(info)
    return out


def _resume_or_start(cfg: PretrainConfig, out: Path, log: RunLog, info: DistInfo,
                     device: torch.device) -> tuple[bool, dict | None]:
    """(finished, checkpoint): a finished run, a run to resume from checkpoints/last.pt, or a fresh
    start (stale outputs of an earlier run in `out` removed). ValueError for another run's folder."""
    ckpt = runs.torch_load_safe(out / runs.LAST) if (out / runs.LAST).is_file() else None
    if ckpt is not None:
        if ckpt.get("method") != METHOD:
            raise ValueError(f"{out}: holds a training run, not a pretraining run; give a new --out")
        changes = _check_same_run(ckpt["config"], cfg, out)
        if ckpt["training_done"] and (out / PRETRAIN_JSON).is_file():
            log(f"{out}: pretraining already finished; nothing to do")
            return True, None
        log(f"resuming {out} from {runs.LAST}: epoch {ckpt['epoch'] + 1}, step {ckpt['step']}"
            + (f" (changed: {', '.join(changes)})" if changes else ""))
        return False, ckpt
    if (out / runs.CONFIG).is_file():  # no checkpoint: a finished run whose checkpoint was deleted, or another run
        saved = runs.load_json(out / runs.CONFIG)
        if saved.get("method") != METHOD:
            raise ValueError(f"{out}: holds a training run, not a pretraining run; give a new --out")
        _check_same_run(saved.get("pretrain", {}), cfg, out)
        if (out / PRETRAIN_JSON).is_file() and (out / runs.BEST).is_file():
            log(f"{out}: finished pretraining run (no checkpoint); nothing to do")
            return True, None
    if info.is_main:
        for name in _RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    distributed.barrier(info)
    log(f"new pretraining run ({METHOD}) in {out} ({info.world_size} process"
        f"{'es' if info.world_size > 1 else ''}, device {device})")
    return False, None


# Fields that may differ when resuming: how to run, not what to compute (as for `medimaging train`).
_RESUMABLE_CHANGES = {"device", "num_workers", "progress", "checkpoint_every", "epochs", "max_steps", "out"}


def _check_same_run(saved: dict, cfg: PretrainConfig, where: Path) -> list[str]:
    """`train_state.check_same_run` with pretraining's resumable fields and no knobs added since."""
    return check_same_run(saved, cfg, where, resumable=_RESUMABLE_CHANGES, added={}, what="pretraining run")


def _load_data(cfg: PretrainConfig, out: Path, log: RunLog, info: DistInfo, show: bool, dirs: list[Path],
               synthetic: bool, paths: list[str], folders: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(the cached images, the rows of the readable ones): every image decoded once into the shared
    cache, one process per node first; rank 0 writes unreadable.csv. DatasetError below 2 images."""
    where = ", ".join(str(d) for d in dirs)
    if not cfg.data:
        log(f"data: no --data given; using {'the SYNTHETIC default ' if synthetic else ''}{where}")
    for f in folders:
        log(f"data: {f['root']}: {f['images']} images (labels not read)")
    if info.local_rank == 0:
        cached = ImageCache(cfg.image_size).load(paths, progress=show)
    distributed.barrier(info)
    if info.local_rank != 0:
        cached = ImageCache(cfg.image_size).load(paths, progress=False)
    rows = np.flatnonzero(np.asarray(cached.ok, dtype=bool))
    if cached.unreadable and info.is_main:
        table = pd.DataFrame([(str(p), str(r)) for p, r in cached.unreadable], columns=["path", "reason"])
        runs.atomic_write_text(out / runs.UNREADABLE_CSV, table.to_csv(index=False))
        log(f"images: {len(cached.unreadable)} unreadable file(s) skipped (listed in {runs.UNREADABLE_CSV})")
    if len(rows) < 2:
        raise DatasetError(f"{where}: {len(rows)} readable image(s); pretraining needs at least 2 (a batch for "
                           "BatchNorm)")
    log(f"data: {len(rows)} images at {cfg.image_size}px")
    return cached.images, rows


def _build_model(cfg: PretrainConfig, log: RunLog, resumed: bool) -> tuple[SimSiam, dict]:
    """(SimSiam model, its input config): the backbone exactly as `medimaging train` builds it, from
    the seed and the configured weights, plus SimSiam's heads. A resumed run's weights load later."""
    torch.manual_seed(cfg.seed)
    start = None if cfg.weights.is_random or resumed else cfg.weights  # None: weights load next, or random
    base = build_model(cfg.model_name, num_labels=1, head="linear", in_chans=cfg.in_chans,
                       image_size=cfg.image_size, pretrained=start)
    input_cfg = model_input_config(base, image_size=cfg.image_size, weights=cfg.weights)  # a resumed model has no weights
    model = SimSiam(base.backbone, base.num_features, cfg.proj_dim, cfg.pred_dim)
    n_backbone = sum(p.numel() for p in base.backbone.parameters())
    log(f"model {cfg.model_name}: backbone {n_backbone / 1e6:.2f}M parameters, {base.num_features} features; "
        f"projector {cfg.proj_dim}, predictor {cfg.pred_dim}; input {input_cfg}")
    if base.pretrained_report is not None:
        log(f"pretrained {cfg.pretrained}: {len(base.pretrained_report['kept'])} backbone weights loaded")
    return model, input_cfg


def _setup_loop(cfg: PretrainConfig, info: DistInfo, device: torch.device, out: Path, log: RunLog, show: bool,
                model: SimSiam, input_cfg: dict, images: np.ndarray, rows: np.ndarray, ckpt: dict | None) -> _Loop:
    """The model on its device (checkpoint weights loaded, SyncBatchNorm and DDP across processes),
    the loader, the schedule, the optimiser, the views and the TensorBoard log."""
    cuda = device.type == "cuda"
    channels_last = cuda and cfg.channels_last
    raw_model, model, amp = distributed.place_model(model, device, info, channels_last=channels_last, bf16=cfg.bf16,
                                                    state=ckpt["model"] if ckpt is not None else None,
                                                    sync_batchnorm=True)  # BatchNorm over the global batch

    dataset = XrayTensorDataset(images, np.zeros((len(images), 0), np.float32), indices=rows)
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(sampler) >= cfg.batch_size,
                        num_workers=cfg.num_workers, pin_memory=cuda, persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator())
    n_steps = len(loader)
    total = n_steps * cfg.epochs if cfg.max_steps is None else min(n_steps * cfg.epochs, cfg.max_steps)
    schedule = WarmupCosine(min(cfg.warmup_steps, total // 5), total, cfg.min_lr_ratio)
    peak_lr = cfg.lr * cfg.batch_size * info.world_size / 256
    optimizer = _optimizer(cfg, raw_model, peak_lr, cuda)
    if ckpt is not None and ckpt.get("images") != len(rows):
        log(f"the folders now hold {len(rows)} readable images, the run started with {ckpt.get('images')}: "
            "from here on it is not the run an uninterrupted one would have been")
    log(f"{n_steps} steps per epoch of {cfg.batch_size} images x {info.world_size} process(es); "
        f"{cfg.optimizer} lr {peak_lr:.3g} (= {cfg.lr:g} x batch / 256), {total} steps in all")
    tensorboard = TensorBoardLog(out, log, enabled=info.is_main,
                                 resume_step=ckpt["step"] + 1 if ckpt is not None else None)
    views = TwoViews(cfg, input_cfg, device, channels_last=channels_last)
    return _Loop(cfg=cfg, info=info, device=device, out=out, log=log, show=show, n_images=int(len(rows)),
                 raw_model=raw_model, model=model, amp=amp, views=views, sampler=sampler, loader=loader,
                 n_steps=n_steps, schedule=schedule, peak_lr=peak_lr, optimizer=optimizer, tensorboard=tensorboard)


def _optimizer(cfg: PretrainConfig, model: SimSiam, lr: float, cuda: bool) -> torch.optim.Optimizer:
    """SGD (the paper's: momentum 0.9, weight decay on every weight) or AdamW (decay on matrices and
    kernels only); the predictor's groups carry `fixed_lr` when it keeps the peak lr."""
    groups = []
    for part in (model.backbone, model.projector, model.predictor):
        fixed = cfg.fix_pred_lr and part is model.predictor
        if cfg.optimizer == "sgd":
            parts = [{"params": [p for p in part.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
        else:
            parts = param_groups(part, cfg.weight_decay)
        groups += [{**g, "fixed_lr": fixed} for g in parts if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr, fused=cuda or None)


def _restore(loop: _Loop, ckpt: dict | None) -> _State:
    """Where the run stands: a fresh state, or the checkpoint's with the optimiser and RNG states."""
    if ckpt is None:
        return _State()
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    state = _State.from_checkpoint(ckpt)
    if not loop.info.is_main:  # rank 0's checkpoint carries the epoch's partial sums
        state.loss_sum, state.loss_count, state.partial = 0.0, 0, _Partial()
    return state


def _train(loop: _Loop, state: _State) -> None:
    """Epochs until the configured number or max_steps; a checkpoint after each."""
    cfg = loop.cfg
    max_steps = cfg.max_steps if cfg.max_steps is not None else float("inf")
    while not state.training_done:
        epoch = state.epoch
        if epoch >= cfg.epochs or state.step >= max_steps:
            state.training_done = True
            _save_checkpoint(loop, state)
            break
        hit_max = _train_epoch(loop, state, max_steps)
        _end_epoch(loop, state, epoch + 1)
        state.epoch, state.batch_in_epoch, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        state.partial = _Partial()
        if hit_max:
            loop.log(f"max_steps={cfg.max_steps} reached")
        state.training_done = hit_max
        _save_checkpoint(loop, state)


def _train_epoch(loop: _Loop, state: _State, max_steps: float) -> bool:
    """The rest of epoch `state.epoch` (all of it, unless resumed mid-epoch); True when it hit max_steps."""
    cfg = loop.cfg
    loop.model.train()
    loop.sampler.set_epoch(state.epoch)
    loop.sampler.start = state.batch_in_epoch * cfg.batch_size  # steps of this epoch already taken (a resume)
    t0 = time.perf_counter()
    pending: list[tuple] = []  # (step, loss, z_std, lr) with device tensors: no sync per step
    bar = tqdm(total=loop.n_steps, initial=state.batch_in_epoch, disable=not loop.show, dynamic_ncols=True,
               desc=f"pretrain epoch {state.epoch + 1}/{cfg.epochs}")
    hit_max = False
    for x, _ in loop.loader:
        loss, z_std = _step(loop, state, x)
        pending.append((state.step, loss, z_std, loop.optimizer.param_groups[0]["lr"]))
        state.partial.images += len(x)
        bar.update(1)
        if loop.show and (state.batch_in_epoch % 10 == 0 or state.batch_in_epoch == loop.n_steps):
            bar.set_postfix(loss=f"{loss.item():.4f}")
        hit_max = state.step >= max_steps
        if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch_in_epoch < loop.n_steps
                and not hit_max):
            _fold(loop, state, pending, t0)
            t0 = time.perf_counter()
            _save_checkpoint(loop, state)
        if hit_max:
            break
    bar.close()
    _fold(loop, state, pending, t0)
    return hit_max


def _step(loop: _Loop, state: _State, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the uint8 batch `x`; its (loss, z_std) as detached device tensors."""
    seed = micro_seed(loop.cfg.seed, state.epoch, state.batch_in_epoch, loop.info.rank)
    torch.manual_seed(seed)  # drop-path and anything else random: a function of the step
    v1, v2 = loop.views(x, torch.Generator().manual_seed(seed))
    with loop.amp:
        p1, p2, z1, z2 = loop.model(v1, v2)
    loss = simsiam_loss(p1, p2, z1, z2)
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    scale = loop.schedule(state.step)
    for group in loop.optimizer.param_groups:
        group["lr"] = loop.peak_lr * (1.0 if group.get("fixed_lr") else scale)
    loop.optimizer.step()
    state.step += 1
    state.batch_in_epoch += 1
    return loss.detach(), spread(z1).detach()


def _fold(loop: _Loop, state: _State, pending: list[tuple], t0: float) -> None:
    """Move the steps since `t0` (device tensors, one sync here) into the state and its step log
    and empty `pending`; rank 0 carries the sums over all ranks."""
    losses = torch.stack([p[1] for p in pending]).float().tolist() if pending else []
    spreads = torch.stack([p[2] for p in pending]).float().tolist() if pending else []
    s, z, n = distributed.all_reduce_sum(loop.info, [sum(losses), sum(spreads), len(pending)], loop.device)
    if loop.info.is_main:
        state.loss_sum += s
        state.loss_count += int(n)
        state.partial.spread_sum += z
        state.step_log += [{"step": p[0], "loss": lo, "z_std": zs, "lr": p[3]}
                           for p, lo, zs in zip(pending, losses, spreads)]
    pending.clear()
    state.partial.seconds += time.perf_counter() - t0


def _end_epoch(loop: _Loop, state: _State, epoch: int) -> None:
    """metrics.csv's row, steps.csv, the log line, the backbone as best.safetensors (the latest epoch's)."""
    cfg, info, out, partial = loop.cfg, loop.info, loop.out, state.partial
    loss = state.loss_sum / state.loss_count if state.loss_count else None
    z_std = partial.spread_sum / state.loss_count if state.loss_count else None
    images = partial.images * info.world_size
    row = {"epoch": epoch, "step": state.step, "train_loss": loss, "z_std": z_std,
           "lr": loop.optimizer.param_groups[0]["lr"],
           "images_per_s": round(images / partial.seconds, 2) if partial.seconds > 0 and images else None,
           "seconds": round(partial.seconds, 2), "images": images}
    state.history.append(row)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    loop.log(f"epoch {epoch}/{cfg.epochs}: step {state.step}, loss {fmt(loss)}, z_std {fmt(z_std)} "
             f"(1: spread, 0: collapsed), {row['images_per_s'] or 0:.1f} images/s, {partial.seconds:.0f} s")
    if info.is_main:
        runs.save_weights(backbone_state(loop.raw_model), out / runs.BEST)
        write_metrics_csv(out / runs.METRICS_CSV, state.history)
        write_metrics_csv(out / STEPS_CSV, state.step_log)
        loop.tensorboard.epoch(row, None)
        if loop.tensorboard.writer is not None and z_std is not None:
            loop.tensorboard.writer.add_scalar("pretrain/z_std", z_std, state.step)
            loop.tensorboard.writer.flush()


def _save_checkpoint(loop: _Loop, state: _State) -> None:
    """checkpoints/last.pt (rank 0; every rank waits): `train_state.save_checkpoint`'s keys plus the
    method (what tells a pretraining run from a training run) and the number of images."""
    save_checkpoint(loop.out / runs.LAST, loop.info, model=loop.raw_model, optimizer=loop.optimizer,
                    scheduler={**loop.schedule.state_dict(), "step": state.step}, config=loop.cfg.asdict(),
                    init=None, state=state,  # LoopState's fields, "partial" and "step_log"
                    method=METHOD, images=loop.n_images)


def _finish(loop: _Loop, state: _State, wall: float) -> None:
    """pretrain.json (the summary) and loss.png."""
    cfg, out, n_images = loop.cfg, loop.out, loop.n_images
    hist = [h for h in state.history if h["train_loss"] is not None]
    seconds = sum(h["seconds"] for h in state.history)
    images = sum(h["images"] for h in state.history)
    summary = {
        "method": METHOD, "model_name": cfg.model_name, "in_chans": cfg.in_chans, "image_size": cfg.image_size,
        "images": n_images, "epochs_done": len(hist), "steps": state.step,
        "train_seconds": round(seconds, 1),  # the optimisation itself, summed over resumed sessions
        "last_session_wall_seconds": round(wall, 1),  # this command: data, model, loop, files
        "images_per_s": round(images / seconds, 2) if seconds else None,
        "loss_first_epoch": hist[0]["train_loss"] if hist else None,
        "loss_last_epoch": hist[-1]["train_loss"] if hist else None,
        "z_std_last_epoch": hist[-1]["z_std"] if hist else None,
        "loss": [h["train_loss"] for h in hist], "z_std": [h["z_std"] for h in hist],
    }
    runs.save_json(out / PRETRAIN_JSON, summary)
    if hist:
        _plot(out / LOSS_PNG, hist, state.step_log, f"{METHOD}, {cfg.model_name} {cfg.image_size}px, {n_images} images")
    loop.log(f"pretraining complete: {out} ({summary['epochs_done']} epochs, {state.step} steps, {seconds:.0f} s, "
             f"{summary['images_per_s'] or 0:.1f} images/s; loss {summary['loss_first_epoch'] or 0:.4f} -> "
             f"{summary['loss_last_epoch'] or 0:.4f})")


def _plot(path: Path, hist: list[dict], steps: list[dict], title: str) -> None:
    """loss.png: every step's loss (thin) and each epoch's mean (dots) against the step; z_std on the right."""
    from matplotlib.figure import Figure  # no pyplot state; only the end of a run pays the import

    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.add_subplot()
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], "-", color="C0", lw=0.8, alpha=0.5,
                label="loss per step")
    ax.plot([h["step"] for h in hist], [h["train_loss"] for h in hist], "o-", color="C0", label="loss, epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("SimSiam loss (-1: views agree)")
    ax2 = ax.twinx()
    ax2.plot([h["step"] for h in hist], [h["z_std"] for h in hist], "s--", color="C1", label="z_std (0: collapsed)")
    ax2.set_ylabel("z_std")
    ax2.set_ylim(0, max(1.1, *(h["z_std"] or 0 for h in hist)))
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.15), fontsize=8)
    ax.set_title(title, fontsize=9)
    atomic_write_png(path, fig, dpi=110)
