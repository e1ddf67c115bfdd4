"""The training engine: `fit(TrainConfig) -> run directory`, on CPU, one GPU or many via torchrun.

    from common.train import TrainConfig, fit
    run_dir = fit(TrainConfig(data=["dataset_full"], task="all14", model_name="efficientnet_b0",
                              out="runs/all14"))

What a run does, top to bottom (`fit`):
  1. data: `load_dataset` each folder (none given: `default_data_dirs()`), `combine`, keep the task's
     rows (`select_task`), `patient_split(seed)`, decode once into the uint8 cache
     (`ImageCache(image_size)`); unreadable files are dropped and listed in RUN_DIR/unreadable.csv;
     the split is stored in RUN_DIR/split.csv (`common.splits`). All of it is `common.train_data`.
  2. model: `build_model` (any timm name), optionally `init_from` an earlier run (stage 1 -> 2) and
     `freeze` the first K stages; config.json records everything needed to rebuild it.
  3. loop: AdamW, linear warmup then cosine decay per optimiser step, gradient accumulation, BCE
     masked where a label is NaN (optionally focal, smoothed, on mixed-up batches), bf16 autocast +
     channels_last on CUDA; the dev split is scored each epoch (metrics.csv), with the weights'
     moving average when `ema` is set; best.safetensors keeps the best dev mean AUROC (dev loss when
     the AUROC is undefined; the last epoch when `keep_best` is off); early stopping; `max_steps`.
  4. end: best weights predict the test split -> test_predictions.csv, thresholds tuned on dev ->
     thresholds.json, metrics.json (test metrics + "dev" + "run"), roc.png.
Each scored epoch also goes to TensorBoard's event files in the run folder (`tensorboard --logdir`
on the run cache shows every run; `common.train_state.TensorBoardLog`).

The loop reads top to bottom in `_fit`: resume or start, data, model, `_setup_loop` (device, DDP,
loaders, schedule, optimiser), `_train` (epochs of `_train_epoch`, each ending in `_end_epoch`,
which scores dev), `_finish`. Where training stands is one `LoopState`, saved in every checkpoint.

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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import common
from common import distributed, runs
from common.cache import XrayTensorDataset
from common.data import select_task
from common.io import atomic_write_png
from common.distributed import DistInfo
from common.metrics import evaluate_predictions, format_table, plot_roc, tune_thresholds
from common.models import build_model, freeze, model_input_config
from common.optim import WarmupCosine, masked_bce, mixup, param_groups, positive_weights, training_loss
from common.runs import init_from
from common.serving import PREDICTIONS_IMAGE_COLUMN, sigmoid
from common.splits import write_split
from common.train_config import TrainConfig
from common.train_data import (
    BatchTransform,
    EvalSplit,
    PreparedData,
    ResumableSampler,
    dev_scores,
    eval_split,
    predict_logits,
    prepare_data,
)
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

__all__ = [
    "TrainConfig", "fit", "prepare_data", "PreparedData", "select_task", "masked_bce",
    "WarmupCosine", "BatchTransform", "ResumableSampler", "model_kwargs", "FitHooks", "LoopState",
]

# Files one run writes; a fresh start in an existing folder removes stale ones first.
_RUN_OUTPUTS = (runs.METRICS_CSV, runs.BEST, runs.THRESHOLDS, runs.METRICS_JSON, runs.TEST_PREDICTIONS,
                runs.ROC_PNG, runs.UNREADABLE_CSV, runs.SPLIT_CSV)


# --------------------------------------------------------------------------------------------
# model


def model_kwargs(cfg: TrainConfig, num_labels: int) -> dict:
    """The `build_model` kwargs (minus `pretrained`): config.json["model"]."""
    return {"model_name": cfg.model_name, "num_labels": num_labels, "head": cfg.head, "in_chans": cfg.in_chans,
            "image_size": cfg.image_size, "head_dropout": cfg.head_dropout}


def _input_config(model: torch.nn.Module, cfg: TrainConfig) -> dict:
    # from the configured weights, not the model's: a resumed run rebuilds its model without them
    ic = dict(model_input_config(model, image_size=cfg.image_size, weights=cfg.weights))
    source = runs.source_input(cfg.init_from) if cfg.init_from else None
    if source and int(source.get("in_chans", -1)) == int(ic["in_chans"]):
        # a backbone from an earlier run keeps the intensity scale it learned on (e.g. a stage 1
        # started from torchxrayvision's weights passes their [-1024, 1024] range to stage 2)
        ic["mean"], ic["std"] = source["mean"], source["std"]
    return {"image_size": int(ic["image_size"]), "mean": [float(v) for v in ic["mean"]],
            "std": [float(v) for v in ic["std"]], "in_chans": int(ic["in_chans"])}


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
    # (training_loss, logits, targets, inputs) -> the loss to minimise, per training micro-batch
    # (inputs / targets: the normalised, augmented, mixed-up when `mixup` is on, batch the model saw). Dev/test scoring is unchanged.
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


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class _Loop:
    """What the loop's steps share, set up once by `_setup_loop` and never reassigned."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    out: Path
    log: RunLog
    show: bool  # progress bars (rank 0, cfg.progress)
    data: PreparedData
    raw_model: torch.nn.Module  # the model itself: what is saved and scored
    model: torch.nn.Module  # what trains on the batches: raw_model or its DDP wrapper
    amp: contextlib.AbstractContextManager
    transform: BatchTransform
    sampler: ResumableSampler
    loader: DataLoader
    n_micro: int  # micro-batches in a whole epoch (len(loader) before a resume skips any)
    schedule: WarmupCosine
    optimizer: torch.optim.Optimizer
    pos_weight: torch.Tensor | None
    ema: torch.nn.Module | None  # the weights' moving average (cfg.ema), scored and kept instead of raw_model
    loss_hook: Callable | None  # FitHooks.loss
    dev: EvalSplit
    test: EvalSplit
    init_info: dict | None  # config.json["init"], also kept in each checkpoint
    tensorboard: TensorBoardLog  # each scored epoch's scalars


def _fit(cfg: TrainConfig, info: DistInfo, device: torch.device, hooks: FitHooks | None = None) -> Path:
    hooks = hooks or FitHooks()
    out = Path(cfg.out)
    log = RunLog(out / runs.LOG, enabled=info.is_main)
    show = info.is_main and cfg.progress

    finished, ckpt = _resume_or_start(cfg, out, log, info, device)
    if finished:
        return out
    data = _load_data(cfg, out, log, info, show,
                      write_split_csv=ckpt is None or not (out / runs.SPLIT_CSV).is_file())
    model, init_info, frozen = _build_model(cfg, data.labels, ckpt, hooks, log)
    # a resumed run keeps the input its first start recorded (its init_from source may have changed since)
    input_cfg = runs.read_config(out)["input"] if ckpt is not None and (out / runs.CONFIG).is_file() \
        else _input_config(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model {cfg.model_name} ({cfg.head} head, {len(data.labels)} output{'s' if len(data.labels) > 1 else ''}): "
        f"{n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; input {input_cfg}")
    if info.is_main and (ckpt is None or not (out / runs.CONFIG).is_file()):
        runs.save_json(out / runs.CONFIG, {
            "model": model_kwargs(cfg, len(data.labels)), "labels": data.labels, "input": input_cfg,
            "train": cfg.asdict(), "data": data.datasets, "synthetic": data.synthetic, "init": init_info,
            "frozen": frozen,
            "split": {s: int(len(i)) for s, i in data.split_index.items()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": common.__version__,
        })

    loop = _setup_loop(cfg, info, device, out, log, show, data, model, input_cfg, ckpt, init_info, hooks)
    state = LoopState()
    if ckpt is not None:
        loop.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        state = LoopState.from_checkpoint(ckpt)
        if not info.is_main:
            state.loss_sum, state.loss_count = 0.0, 0  # rank 0's checkpoint carries the epoch's partial sum
        if ckpt["scheduler"].get("total_steps") != loop.schedule.total_steps:
            log(f"the schedule now ends at step {loop.schedule.total_steps} "
                f"(was {ckpt['scheduler'].get('total_steps')})")
        del ckpt  # free the host copy of the weights

    try:
        _train(loop, state)
        return _finish(loop, state)
    finally:
        loop.tensorboard.close()


def _resume_or_start(cfg: TrainConfig, out: Path, log: RunLog, info: DistInfo,
                     device: torch.device) -> tuple[bool, dict | None]:
    """(finished, checkpoint): a finished run, a run to resume from checkpoints/last.pt, or a fresh
    start (stale outputs of an earlier run in `out` removed)."""
    ckpt = runs.torch_load_safe(out / runs.LAST) if (out / runs.LAST).is_file() else None
    if ckpt is None and (out / runs.METRICS_JSON).is_file() and (out / runs.CONFIG).is_file():
        check_same_run(runs.read_config(out).get("train", {}), cfg, out)
        log(f"{out}: finished run (metrics.json present, no checkpoint); nothing to do")
        return True, None
    if ckpt is not None:
        changes = check_same_run(ckpt["config"], cfg, out)
        if ckpt["training_done"] and (out / runs.METRICS_JSON).is_file():
            log(f"{out}: run already finished; nothing to do")
            return True, None
        log(f"resuming {out} from {runs.LAST}: epoch {ckpt['epoch'] + 1}, micro-batch {ckpt['batch_in_epoch']}, "
            f"step {ckpt['step']}" + (f" (changed: {', '.join(changes)})" if changes else ""))
        return False, ckpt
    if info.is_main:
        for name in _RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    distributed.barrier(info)
    log(f"new run in {out} ({info.world_size} process{'es' if info.world_size > 1 else ''}, device {device})")
    return False, None


def _load_data(cfg: TrainConfig, out: Path, log: RunLog, info: DistInfo, show: bool,
               write_split_csv: bool) -> PreparedData:
    """`prepare_data`, one process per node first (it fills the cache, the others then read it);
    rank 0 writes unreadable.csv and, on a fresh start, split.csv."""
    if info.local_rank == 0:
        data = prepare_data(cfg, log=log, progress=show)
    distributed.barrier(info)
    if info.local_rank != 0:
        data = prepare_data(cfg, log=log, progress=False)
    if info.is_main and data.unreadable:
        table = pd.DataFrame(data.unreadable, columns=["path", "reason"])
        runs.atomic_write_text(out / runs.UNREADABLE_CSV, table.to_csv(index=False))
    if not len(data.split_index["train"]):
        raise ValueError(f"{out}: the train split is empty ({len(data.frame)} images in total); add data")
    if info.is_main and write_split_csv:
        write_split(out, data.frame)
    return data


def _build_model(cfg: TrainConfig, labels: list[str], ckpt: dict | None, hooks: FitHooks,
                 log: RunLog) -> tuple[torch.nn.Module, dict | None, list[str]]:
    """(model, config.json["init"], frozen groups): built from the seed, started from the configured
    weights or an earlier run, hooked, frozen. A resumed run's weights load later, on the device."""
    torch.manual_seed(cfg.seed)  # random init is a function of the seed
    mkw = model_kwargs(cfg, len(labels))
    init_info: dict | None = None
    if ckpt is not None:
        model = build_model(**mkw, pretrained=None)  # weights come from the checkpoint
        init_info = ckpt.get("init")
    else:
        model = build_model(**mkw, pretrained=cfg.weights if cfg.init_from is None else None)  # None: no warning, weights follow
        if cfg.init_from is not None:
            if not cfg.weights.is_random:
                log("init_from given: the backbone comes from it, so --pretrained is not loaded")
            res = init_from(model, cfg.init_from)
            init_info = {"source": str(cfg.init_from), **{k: list(res[k]) for k in ("kept", "dropped", "new")}}
            log(f"init_from {cfg.init_from}: kept {len(res['kept'])} keys, dropped {len(res['dropped'])}"
                f" ({_summarise(res['dropped'])}), new {len(res['new'])} ({_summarise(res['new'])})")
    if hooks.on_model is not None:
        hooked = hooks.on_model(model, log)
        if ckpt is None and hooked is not None:
            init_info = hooked
    if ckpt is None and cfg.init_from is None and cfg.weights.is_random and hooks.on_model is None:
        log("random initialisation (no --pretrained, no --init-from): expect results far below published ones")
    frozen = freeze(model, cfg.freeze) if cfg.freeze else []
    if frozen:
        log(f"freeze {cfg.freeze}: {len(frozen)} group(s) frozen: {_summarise(frozen)}")
    return model, init_info, frozen


def _setup_loop(cfg: TrainConfig, info: DistInfo, device: torch.device, out: Path, log: RunLog, show: bool,
                data: PreparedData, model: torch.nn.Module, input_cfg: dict, ckpt: dict | None,
                init_info: dict | None, hooks: FitHooks) -> _Loop:
    """The model on its device (checkpoint weights loaded, DDP), the loaders, the schedule, the optimiser."""
    cuda = device.type == "cuda"
    channels_last = cuda and cfg.channels_last
    raw_model, model, amp = distributed.place_model(model, device, info, channels_last=channels_last, bf16=cfg.bf16,
                                                    state=ckpt["model"] if ckpt is not None else None)

    dataset = XrayTensorDataset(data.images, data.y)
    train_rows = data.split_index["train"]
    train_set = Subset(dataset, train_rows.tolist())
    sampler = ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    # full batches only when there are enough images: a last batch of 1 breaks BatchNorm
    drop_last = len(sampler) >= cfg.batch_size
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=cfg.num_workers, pin_memory=cuda, persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator())  # own generator: the global RNG stays untouched
    n_micro = len(loader)
    total_steps = math.ceil(n_micro / cfg.grad_accum) * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = min(cfg.warmup_steps, total_steps // 5)
    if warmup < cfg.warmup_steps:
        log(f"warmup_steps {cfg.warmup_steps} is more than 20% of the run's {total_steps} steps: using {warmup}")
    schedule = WarmupCosine(warmup, total_steps, cfg.min_lr_ratio)
    dev = eval_split("dev", data.split_index["dev"], dataset, cfg, info, cuda)
    test = eval_split("test", data.split_index["test"], dataset, cfg, info, cuda)
    transform = BatchTransform.for_training(input_cfg, device, cfg, channels_last=channels_last)
    pos_weight = None
    if cfg.pos_weight:
        pw = positive_weights(data.y[train_rows])
        pos_weight = torch.from_numpy(pw).to(device)
        log("pos_weight (neg/pos on train): " + ", ".join(f"{n} {w:.2f}" for n, w in zip(data.labels, pw)))
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, fused=cuda or None)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3  # timm's EMA, with warmup: early steps average over fewer

        ema = ModelEmaV3(raw_model, decay=cfg.ema, use_warmup=True)
        if ckpt is not None:
            ema.load_state_dict(ckpt["ema"])
    # on resume, events logged after the checkpoint's step are dropped (they are logged again)
    tensorboard = TensorBoardLog(out, log, enabled=info.is_main, resume_step=ckpt["step"] + 1 if ckpt else None)
    return _Loop(cfg=cfg, info=info, device=device, out=out, log=log, show=show, data=data, raw_model=raw_model,
                 model=model, amp=amp, transform=transform, sampler=sampler, loader=loader, n_micro=n_micro,
                 schedule=schedule, optimizer=optimizer, pos_weight=pos_weight, ema=ema, loss_hook=hooks.loss, dev=dev,
                 test=test, init_info=init_info, tensorboard=tensorboard)


def _train(loop: _Loop, state: LoopState) -> None:
    """Epochs until the configured number, max_steps or early stopping; a checkpoint after each."""
    cfg = loop.cfg
    if cfg.max_steps == 0 and not state.training_done:
        loop.log("max_steps=0: scoring the initial weights only")
        _end_epoch(loop, state, 0, 0.0, 0)
        state.training_done = True
        _save_checkpoint(loop, state)
    max_steps = cfg.max_steps if cfg.max_steps is not None else float("inf")
    while not state.training_done:
        epoch = state.epoch
        if epoch >= cfg.epochs or state.step >= max_steps:
            state.training_done = True
            _save_checkpoint(loop, state)
            break
        seconds, images, hit_max = _train_epoch(loop, state, max_steps)
        stop = _end_epoch(loop, state, epoch + 1, seconds, images * loop.info.world_size)
        state.epoch, state.batch_in_epoch, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        if hit_max:
            loop.log(f"max_steps={cfg.max_steps} reached")
        state.training_done = stop or hit_max
        _save_checkpoint(loop, state)


def _train_epoch(loop: _Loop, state: LoopState, max_steps: float) -> tuple[float, int, bool]:
    """The rest of epoch `state.epoch` (all of it, unless resumed mid-epoch); (seconds, images, hit max_steps)."""
    cfg = loop.cfg
    loop.model.train()
    loop.sampler.set_epoch(state.epoch)
    first = state.batch_in_epoch  # micro-batches of this epoch already trained (a resumed run)
    loop.sampler.start = first * cfg.batch_size
    started, images = time.perf_counter(), 0
    loss_acc = torch.zeros((), device=loop.device)  # device-side sum: no sync per micro-batch
    bar = tqdm(total=loop.n_micro, initial=first, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=not loop.show, dynamic_ncols=True)
    micro, hit_max = first, False
    for x, y in loop.loader:
        group_start = (micro // cfg.grad_accum) * cfg.grad_accum
        group_size = min(cfg.grad_accum, loop.n_micro - group_start)
        sync_now = micro + 1 - group_start == group_size
        loss = _micro_batch(loop, state.epoch, micro, x, y, group_size, sync_now)
        loss_acc += loss.detach()
        micro += 1
        images += len(x)
        bar.update(1)
        if not sync_now:
            continue
        _optimizer_step(loop, state)
        state.batch_in_epoch = micro
        if micro % 10 == 0 or micro == loop.n_micro:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{loop.optimizer.param_groups[0]['lr']:.2e}")
        hit_max = state.step >= max_steps
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and micro < loop.n_micro and not hit_max:
            done = loss_acc.item()
            loss_acc.zero_()
            s, n = distributed.all_reduce_sum(loop.info, [done, micro - first], loop.device)
            # rank 0 carries the whole epoch's partial sum, the others restart from zero
            state.loss_sum += s if loop.info.is_main else 0.0
            state.loss_count += int(n) if loop.info.is_main else 0
            first = micro
            _save_checkpoint(loop, state)
        if hit_max:
            break
    bar.close()
    state.loss_sum += loss_acc.item()
    state.loss_count += micro - first
    return time.perf_counter() - started, images, hit_max


def _micro_batch(loop: _Loop, epoch: int, micro: int, x: torch.Tensor, y: torch.Tensor, group_size: int,
                 sync_now: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch (gradients accumulate); its loss."""
    cfg, info = loop.cfg, loop.info
    seed = micro_seed(cfg.seed, epoch, micro, info.rank)
    torch.manual_seed(seed)  # dropout and anything else random: a function of (seed, epoch, micro, rank)
    gen = torch.Generator(device="cpu").manual_seed(seed) if cfg.augment else None
    inputs = loop.transform(x, gen)
    targets = y.to(loop.device, non_blocking=True)
    if cfg.mixup:
        inputs, targets = mixup(inputs, targets, cfg.mixup, seed)
    # DDP averages gradients across ranks only on the micro-batch that ends an accumulation group
    no_sync = loop.model.no_sync() if info.enabled and not sync_now else contextlib.nullcontext()
    with no_sync:
        with loop.amp:
            logits = loop.model(inputs)
        loss = training_loss(cfg, logits, targets, loop.pos_weight)
        if loop.loss_hook is not None:
            loss = loop.loss_hook(loss, logits, targets, inputs)
        (loss / group_size).backward()
    return loss


def _optimizer_step(loop: _Loop, state: LoopState) -> None:
    cfg, optimizer = loop.cfg, loop.optimizer
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(loop.raw_model.parameters(), cfg.grad_clip)
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * loop.schedule(state.step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if loop.ema is not None:
        loop.ema.update(loop.raw_model, step=state.step)


def _scored(loop: _Loop) -> torch.nn.Module:
    """The weights dev scores and best.safetensors keeps: the moving average when the run keeps one."""
    return loop.ema.module if loop.ema is not None else loop.raw_model


def _end_epoch(loop: _Loop, state: LoopState, epoch: int, seconds: float, images: int) -> bool:
    """Score dev after `epoch` (1-based; 0 = the initial weights), keep the best weights and write
    metrics.csv; True = stop early."""
    cfg, info, log = loop.cfg, loop.info, loop.log
    train_loss = None
    if state.loss_count:
        s, n = distributed.all_reduce_sum(info, [state.loss_sum, state.loss_count], loop.device)
        train_loss = s / n
    scores = dev_scores(predict_logits(_scored(loop), loop.dev, loop.transform, loop.amp, info, loop.show),
                         loop.data.y[loop.dev.rows], loop.data.labels) \
        if len(loop.dev.rows) else {"loss": None, "mean_auroc": None, "mean_accuracy": None}
    if scores["mean_auroc"] is not None:
        metric, score = "dev_mean_auroc", scores["mean_auroc"]
    elif scores["loss"] is not None:
        metric, score = "dev_loss", -scores["loss"]
    else:
        metric, score = "epoch", float(epoch)  # no dev split: the latest epoch is the best one
    if state.best_metric not in (None, metric):
        state.best_score = None  # the dev AUROC became (un)defined: compare like with like
    improved = state.best_score is None or score > state.best_score or not cfg.keep_best
    if improved:
        state.best_score, state.best_metric, state.best_epoch, state.bad_epochs = score, metric, epoch, 0
        if info.is_main:
            runs.save_weights(_scored(loop).state_dict(), loop.out / runs.BEST)
    else:
        state.bad_epochs += 1
    state.history.append({
        "epoch": epoch, "step": state.step, "train_loss": train_loss, "dev_loss": scores["loss"],
        "dev_mean_auroc": scores["mean_auroc"], "dev_mean_accuracy": scores["mean_accuracy"],
        "lr": loop.optimizer.param_groups[0]["lr"],
        "images_per_s": round(images / seconds, 2) if seconds > 0 and images else None,
        "seconds": round(seconds, 2), "best": improved,
    })
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    log(f"epoch {epoch}/{cfg.epochs}: step {state.step}, train loss {fmt(train_loss)}, dev loss {fmt(scores['loss'])}, "
        f"dev mean AUROC {fmt(scores['mean_auroc'])}, dev mean accuracy {fmt(scores['mean_accuracy'])}"
        + (" (best)" if improved else f" (no better for {state.bad_epochs} epoch(s))"))
    if info.is_main:
        write_metrics_csv(loop.out / runs.METRICS_CSV, state.history)
        loop.tensorboard.epoch(state.history[-1], scores.get("auroc"))
    stop = cfg.patience > 0 and state.bad_epochs >= cfg.patience
    if stop:
        log(f"early stop: dev {metric} not better for {cfg.patience} epochs (best epoch {state.best_epoch})")
    return stop


def _save_checkpoint(loop: _Loop, state: LoopState) -> None:
    save_checkpoint(loop.out / runs.LAST, loop.info, model=loop.raw_model, optimizer=loop.optimizer,
                    scheduler={**loop.schedule.state_dict(), "step": state.step}, config=loop.cfg.asdict(),
                    init=loop.init_info, state=state, ema=loop.ema)


def _summarise(names: Sequence[str], limit: int = 4) -> str:
    names = list(names)
    if not names:
        return "none"
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# the end: best weights -> dev thresholds, test predictions and metrics


def _finish(loop: _Loop, state: LoopState) -> Path:
    cfg, out, log, info, data = loop.cfg, loop.out, loop.log, loop.info, loop.data
    labels = data.labels
    loop.raw_model.load_state_dict(runs.load_weights(out / runs.BEST))
    log(f"best epoch {state.best_epoch} by {state.best_metric}; predicting dev and test with its weights")
    dev_prob = _probabilities(loop, loop.dev)
    test_prob = _probabilities(loop, loop.test)
    if not info.is_main:
        distributed.barrier(info)
        return out
    y_dev, y_test = data.y[loop.dev.rows], data.y[loop.test.rows]
    if dev_prob is not None:
        thresholds = {k: float(v) for k, v in tune_thresholds(y_dev, dev_prob, labels).items()}
        dev_metrics = evaluate_predictions(y_dev, dev_prob, labels, thresholds=thresholds, n_boot=cfg.n_boot,
                                           seed=cfg.seed)
    else:
        log("dev split is empty: thresholds stay at 0.5")
        thresholds, dev_metrics = {n: 0.5 for n in labels}, None
    runs.save_json(out / runs.THRESHOLDS, thresholds)

    ids = data.frame["image_id"].to_numpy()
    pred = pd.DataFrame({PREDICTIONS_IMAGE_COLUMN: ids[loop.test.rows]})
    for j, name in enumerate(labels):
        pred[name] = test_prob[:, j] if test_prob is not None else np.zeros(0)
    runs.atomic_write_text(out / runs.TEST_PREDICTIONS, pred.to_csv(index=False, float_format="%.8g"))
    run_info = {
        "task": cfg.task, "model_name": cfg.model_name, "labels": labels, "synthetic": data.synthetic,
        "images": {s: int(len(i)) for s, i in data.split_index.items()}, "epochs_done": len(
            [h for h in state.history if h["train_loss"] is not None]),
        "steps": state.step, "best_epoch": state.best_epoch, "best_metric": state.best_metric,
        "best_score": state.best_score, "world_size": info.world_size,
        "train_seconds": round(sum(h.get("seconds") or 0.0 for h in state.history), 1),
    }
    if test_prob is not None:
        metrics = evaluate_predictions(y_test, test_prob, labels, thresholds=thresholds, n_boot=cfg.n_boot,
                                       seed=cfg.seed)
        title = f"{cfg.model_name}, {cfg.task}: test ROC" + (" (SYNTHETIC data)" if data.synthetic else "")
        atomic_write_png(out / runs.ROC_PNG, plot_roc(y_test, test_prob, labels, title=title))
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


def _probabilities(loop: _Loop, split: EvalSplit) -> np.ndarray | None:
    """The split's predicted probabilities (every rank takes part), None for an empty split."""
    if not len(split.rows):
        return None
    return sigmoid(predict_logits(loop.raw_model, split, loop.transform, loop.amp, loop.info, loop.show))

