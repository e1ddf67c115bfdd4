"""`medimaging pretrain`: self-supervised pretraining (SimSiam) of any timm backbone on every image given.

    medimaging pretrain --data dataset_full --data dataset_cardiomegaly --out runs/pretrain
    medimaging train --data dataset_full --task all14 --init-from runs/pretrain \\
        --model resnet18 --in-chans 1 --image-size 128 --out runs/all14

Labels are ignored: every image file below each --data folder is used. Rerunning the same command
resumes from RUN_DIR/checkpoints/last.pt. `common.pretrain` does the work.
"""
from __future__ import annotations

import argparse
import sys

from common.commands._types import non_negative_int, positive_int, unit_interval
from common.pretrain_config import OPTIMIZERS, PretrainConfig

HELP = "self-supervised pretraining (SimSiam) on unlabelled images; the run is an --init-from for train"

_D = PretrainConfig()  # defaults shown in --help; no torch import here


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="DIR", default=None,
                   help="folder of images (any layout; label files are not read, every image below it is used); "
                        "repeat to combine; default: the folders `medimaging train` would use")
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="model_name", metavar="NAME", default=_D.model_name,
                   help=f"any timm.list_models() name; fine-tune with the same one (default: {_D.model_name})")
    g.add_argument("--in-chans", type=int, choices=(1, 3), default=_D.in_chans,
                   help=f"input channels (default: {_D.in_chans})")
    g.add_argument("--image-size", type=positive_int, default=_D.image_size, metavar="N",
                   help=f"input side in pixels (default: {_D.image_size})")
    g.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="PATH_OR_URL",
                   help="start from these weights (the flag alone: timm hub) and adapt them in-domain; default: random")
    g.add_argument("--proj-dim", type=positive_int, default=_D.proj_dim, metavar="N",
                   help=f"projector width (default: {_D.proj_dim})")
    g.add_argument("--pred-dim", type=positive_int, default=_D.pred_dim, metavar="N",
                   help=f"predictor bottleneck width (default: {_D.pred_dim})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=_D.epochs, metavar="N", help=f"(default: {_D.epochs})")
    g.add_argument("--max-steps", type=positive_int, default=None, metavar="N", help="stop after N steps (smoke runs)")
    g.add_argument("--batch-size", type=positive_int, default=_D.batch_size, metavar="N",
                   help=f"images per step per process, each seen as two views (default: {_D.batch_size})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=_D.optimizer, help=f"(default: {_D.optimizer})")
    g.add_argument("--lr", type=float, default=_D.lr,
                   help=f"base learning rate per 256 images; the step's is lr x batch / 256 (default: {_D.lr})")
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay, help=f"(default: {_D.weight_decay})")
    g.add_argument("--warmup-steps", type=non_negative_int, default=_D.warmup_steps, metavar="N",
                   help=f"linear warmup, at most 20%% of the run (default: {_D.warmup_steps})")
    g = p.add_argument_group("views")
    g.add_argument("--crop-scale", nargs=2, type=float, metavar=("LOW", "HIGH"), default=list(_D.crop_scale),
                   help=f"random resized crop, fraction of the area (default: {_D.crop_scale[0]} {_D.crop_scale[1]})")
    g.add_argument("--rotate-degrees", type=float, default=_D.rotate_degrees,
                   help=f"random rotation, +- degrees (default: {_D.rotate_degrees:g})")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=_D.hflip,
                   help="random left-right flip (off by default: the heart's side is information)")
    g.add_argument("--blur-prob", type=unit_interval, default=_D.blur_prob, help=f"(default: {_D.blur_prob})")
    g.add_argument("--intensity-strength", type=float, default=_D.intensity_strength, metavar="S",
                   help=f"gamma / contrast / brightness changes, 0: none (default: {_D.intensity_strength:g})")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=_D.seed, help=f"init, order, views (default: {_D.seed})")
    g.add_argument("--workers", dest="num_workers", type=non_negative_int, default=_D.num_workers, metavar="N",
                   help=f"DataLoader workers (default: {_D.num_workers})")
    g.add_argument("--device", default=_D.device, help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=_D.bf16, help="bf16 autocast on CUDA")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=_D.checkpoint_every, metavar="N",
                   help=f"write last.pt every N steps too, 0: epoch ends only (default: {_D.checkpoint_every})")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (rerun the command to resume)")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The PretrainConfig a parsed `medimaging pretrain` command line describes."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["data"] = list(args.data or [])
    values["crop_scale"] = tuple(values["crop_scale"])
    return PretrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    import os

    from common.data import DatasetError
    from common.io import load_json
    from common.pretrain import PRETRAIN_JSON, pretrain

    try:
        cfg = config_from_args(args).validate()
        run_dir = pretrain(cfg)
    except (DatasetError, ValueError, FileNotFoundError) as err:
        print(f"medimaging pretrain: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    s = load_json(run_dir / PRETRAIN_JSON)
    loss = "n/a" if s["loss_first_epoch"] is None else f"{s['loss_first_epoch']:.4f} -> {s['loss_last_epoch']:.4f}"
    print(f"pretrained {s['model_name']} ({s['method']}) on {s['images']} images: {s['epochs_done']} epochs, "
          f"{s['steps']} steps in {s['train_seconds']:.0f} s ({s['images_per_s'] or 0:.1f} images/s); "
          f"loss {loss}, z_std {s['z_std_last_epoch'] or 0:.3f}")
    print(f"run directory: {run_dir}")
    print(f"fine-tune from it: medimaging train --init-from {run_dir} --model {s['model_name']} "
          f"--in-chans {s['in_chans']} --image-size {s['image_size']} --data DIR --out RUN")
    return 0
