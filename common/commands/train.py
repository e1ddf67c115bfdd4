"""`medimaging train`: fit any timm backbone on any combination of datasets (also under torchrun).

    medimaging train --data dataset_cardiomegaly --data dataset_full --task cardiomegaly --out runs/stage1
    medimaging train --data dataset_full --task all14 --init-from runs/stage1 --out runs/stage2
    torchrun --nproc_per_node=2 -m common train --data dataset_full --out runs/ddp

Rerunning the same command resumes from RUN_DIR/checkpoints/last.pt.
"""
from __future__ import annotations

import argparse

from common.commands._types import STRICT_HELP, non_negative_int, positive_int
from common.train_config import HEADS, TrainConfig

HELP = "train a model (any timm backbone) and write a run directory; rerun to resume"

_D = TrainConfig()  # defaults shown in --help; no torch import here


def add_arguments(p: argparse.ArgumentParser) -> None:
    from common.labels import TASKS

    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="DIR", default=None,
                   help="dataset folder in any layout (NIH official, dataset_full, dataset_cardiomegaly); repeat to "
                        "combine; default: dataset_full/ and dataset_cardiomegaly/, else the synthetic set")
    g.add_argument("--strict", action="store_true", help=STRICT_HELP)
    g.add_argument("--task", choices=sorted(TASKS), default=_D.task,
                   help=f"'cardiomegaly' = stage 1 (one output), 'all14' = stage 2 (default: {_D.task})")
    g.add_argument("--split", dest="split_fractions", nargs=3, type=float, metavar=("TRAIN", "DEV", "TEST"),
                   default=list(_D.split_fractions),
                   help="patient split fractions; NIH's official test list wins when present (default: 0.7 0.1 0.2)")
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="model_name", metavar="NAME", default=_D.model_name,
                   help=f"any timm.list_models() name (default: {_D.model_name})")
    g.add_argument("--head", choices=HEADS, default=_D.head, help=f"classifier head (default: {_D.head})")
    g.add_argument("--head-dropout", type=float, default=_D.head_dropout, help=f"MLP head dropout (default: {_D.head_dropout})")
    g.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="PATH_OR_URL",
                   help="start from pretrained weights: the flag alone (or 'hub') = timm hub (needs internet), or a "
                        "local weights file/folder or URL; default: random init (far below published results)")
    g.add_argument("--init-from", metavar="RUN", default=None,
                   help="backbone from an earlier run dir or checkpoint (stage 1 -> stage 2); the head is new")
    g.add_argument("--freeze", type=int, default=_D.freeze, metavar="K",
                   help="freeze the first K backbone stages/blocks (-1: the whole backbone)")
    g.add_argument("--in-chans", type=int, choices=(1, 3), default=_D.in_chans, help="input channels (default: 3)")
    g.add_argument("--image-size", type=positive_int, default=_D.image_size, metavar="N",
                   help=f"input side in pixels (default: {_D.image_size})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=_D.epochs, metavar="N", help=f"(default: {_D.epochs})")
    g.add_argument("--max-steps", type=non_negative_int, default=None, metavar="N",
                   help="stop after N optimiser steps (smoke runs); the run dir is still complete")
    g.add_argument("--batch-size", type=positive_int, default=_D.batch_size, metavar="N",
                   help=f"per process (default: {_D.batch_size})")
    g.add_argument("--grad-accum", type=positive_int, default=_D.grad_accum, metavar="N",
                   help="micro-batches per optimiser step (default: 1)")
    g.add_argument("--lr", type=float, default=_D.lr, help=f"peak learning rate (default: {_D.lr})")
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay, help=f"AdamW (default: {_D.weight_decay})")
    g.add_argument("--warmup-steps", type=non_negative_int, default=_D.warmup_steps, metavar="N",
                   help=f"linear warmup (default: {_D.warmup_steps}, at most 20%% of the run)")
    g.add_argument("--grad-clip", type=float, default=_D.grad_clip, help="clip the gradient norm (0: off)")
    g.add_argument("--pos-weight", action=argparse.BooleanOptionalAction, default=_D.pos_weight,
                   help="weight positives by neg/pos train prevalence")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=_D.augment,
                   help=f"random affine on train batches (+-{_D.rotate_degrees:g} degrees)")
    g.add_argument("--rotate-degrees", type=float, default=_D.rotate_degrees, help="augmentation rotation range")
    g.add_argument("--patience", type=non_negative_int, default=_D.patience, metavar="N",
                   help=f"early stopping after N epochs without a better dev score, 0: off (default: {_D.patience})")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=_D.seed, help=f"split, init, order, augmentation (default: {_D.seed})")
    g.add_argument("--workers", dest="num_workers", type=non_negative_int, default=_D.num_workers, metavar="N",
                   help=f"DataLoader workers (default: {_D.num_workers})")
    g.add_argument("--device", default=_D.device, help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=_D.bf16, help="bf16 autocast on CUDA")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=_D.checkpoint_every, metavar="N",
                   help=f"write last.pt every N optimiser steps too, 0: epoch ends only (default: {_D.checkpoint_every})")
    g.add_argument("--eval-batch-size", type=positive_int, default=_D.eval_batch_size, metavar="N")
    g.add_argument("--n-boot", type=non_negative_int, default=_D.n_boot, metavar="N",
                   help=f"bootstrap resamples for AUROC intervals (default: {_D.n_boot})")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (rerun the command to resume)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a parsed `medimaging train` command line describes."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["data"] = list(args.data or [])
    values["split_fractions"] = tuple(values["split_fractions"])
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    import os

    from common.io import load_json
    from common.labelfiles import strict_labels
    from common.metrics import format_table
    from common.runs import METRICS_JSON
    from common.train import fit

    cfg = config_from_args(args).validate()
    with strict_labels(args.strict):  # read where fit loads the label files
        run_dir = fit(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"run directory: {run_dir}")
    metrics_path = run_dir / METRICS_JSON
    if metrics_path.is_file():
        metrics = load_json(metrics_path)
        if metrics.get("n_images"):
            synthetic = metrics.get("run", {}).get("synthetic")
            print(("SYNTHETIC data: " if synthetic else "") + "test split")
            print(format_table(metrics))
        else:
            print("no test metrics: the test split is empty")
    return 0
