"""`medimaging train`: fit any timm backbone on any combination of datasets (also under torchrun).

    medimaging train --data dataset_cardiomegaly --data dataset_full --task cardiomegaly --out runs/stage1
    medimaging train --data dataset_full --task all14 --init-from runs/stage1 --out runs/stage2
    torchrun --nproc_per_node=2 -m common train --data dataset_full --out runs/ddp

Rerunning the same command resumes from RUN_DIR/checkpoints/last.pt.
"""
from __future__ import annotations

import argparse

from common.commands._types import STRICT_HELP, non_negative_int, positive_int
from common.train_config import HEADS, LOSSES, RECIPES, SMALL_DATA_RECIPE, TrainConfig

HELP = "train a model (any timm backbone) and write a run directory; rerun to resume"

_D = TrainConfig()  # defaults shown in --help; no torch import here


def _default(name: str):
    """An option's parser default: None where the recipe decides it (resolved in `config_from_args`)."""
    return None if name in SMALL_DATA_RECIPE else getattr(_D, name)


def _shown(name: str) -> str:
    """'(default: X)', plus the small-data recipe's value where it has one."""
    if name in SMALL_DATA_RECIPE:
        return f"(default: {getattr(_D, name)}; small-data recipe: {SMALL_DATA_RECIPE[name]})"
    return f"(default: {getattr(_D, name)})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    for group in (_data_options, _model_options, _optimisation_options, _run_options):
        group(p)


def _data_options(p: argparse.ArgumentParser) -> None:
    from common.labels import TASKS

    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="DIR", default=None,
                   help="dataset folder in any layout (NIH official, dataset_full, dataset_cardiomegaly); repeat to "
                        "combine; default: dataset_full/ and dataset_cardiomegaly/, else the synthetic set")
    g.add_argument("--strict", action="store_true", help=STRICT_HELP)
    g.add_argument("--task", choices=sorted(TASKS), default=_default("task"),
                   help=f"'cardiomegaly' = stage 1 (one output), 'all14' = stage 2 {_shown('task')}")
    g.add_argument("--folds", type=non_negative_int, default=_default("folds"), metavar="K",
                   help="patient-wise K-fold cross-validation: this run tests on fold --fold (0: no folds)")
    g.add_argument("--fold", type=non_negative_int, default=_default("fold"), metavar="I",
                   help="which fold is the test split, 0 .. K-1")
    g.add_argument("--split", dest="split_fractions", nargs=3, type=float, metavar=("TRAIN", "DEV", "TEST"),
                   default=list(_D.split_fractions),
                   help="patient split fractions; NIH's official test list wins when present (default: 0.7 0.1 0.2)")


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--recipe", choices=RECIPES, default="auto",
                   help="'small-data': the recipe measured on a few hundred real radiographs from random init "
                        "(bench/bench_recipe.py); 'study': the study's settings, meant for pretrained weights; "
                        "'auto' (default): small-data on real data without --pretrained. Options given "
                        "explicitly always win")
    g.add_argument("--model", dest="model_name", metavar="NAME", default=_default("model_name"),
                   help=f"any timm.list_models() name {_shown('model_name')}")
    g.add_argument("--head", choices=HEADS, default=_default("head"), help=f"classifier head {_shown('head')}")
    g.add_argument("--head-dropout", type=float, default=_default("head_dropout"), help=f"MLP head dropout {_shown('head_dropout')}")
    g.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="PATH_OR_URL",
                   help="start from pretrained weights: the flag alone (or 'hub') = timm hub (needs internet), or a "
                        "local weights file/folder or URL, or xrv:NAME for torchxrayvision's chest X-ray weights "
                        "(e.g. xrv:densenet121-res224-all; they set the model, 1 channel and the size); "
                        "default: random init (far below published results)")
    g.add_argument("--init-from", metavar="RUN", default=None,
                   help="backbone from an earlier run dir or checkpoint (stage 1 -> stage 2); the head is new")
    g.add_argument("--freeze", type=int, default=_default("freeze"), metavar="K",
                   help="freeze the first K backbone stages/blocks (-1: the whole backbone)")
    g.add_argument("--in-chans", type=int, choices=(1, 3), default=_default("in_chans"), help=f"input channels {_shown('in_chans')}")
    g.add_argument("--image-size", type=positive_int, default=_default("image_size"), metavar="N",
                   help=f"input side in pixels {_shown('image_size')}")


def _optimisation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=_default("epochs"), metavar="N", help=f"{_shown('epochs')}")
    g.add_argument("--max-steps", type=non_negative_int, default=None, metavar="N",
                   help="stop after N optimiser steps (smoke runs); the run dir is still complete")
    g.add_argument("--batch-size", type=positive_int, default=_default("batch_size"), metavar="N",
                   help=f"per process {_shown('batch_size')}")
    g.add_argument("--grad-accum", type=positive_int, default=_default("grad_accum"), metavar="N",
                   help="micro-batches per optimiser step (default: 1)")
    g.add_argument("--lr", type=float, default=_default("lr"), help=f"peak learning rate {_shown('lr')}")
    g.add_argument("--weight-decay", type=float, default=_default("weight_decay"), help=f"AdamW {_shown('weight_decay')}")
    g.add_argument("--warmup-steps", type=non_negative_int, default=_default("warmup_steps"), metavar="N",
                   help=f"linear warmup {_shown('warmup_steps')}, at most 20%% of the run")
    g.add_argument("--grad-clip", type=float, default=_default("grad_clip"), help="clip the gradient norm (0: off)")
    g.add_argument("--pos-weight", action=argparse.BooleanOptionalAction, default=_default("pos_weight"),
                   help="weight positives by neg/pos train prevalence")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=_default("augment"),
                   help="random rotation, zoom and shift of train batches (--rotate-degrees, --zoom, --translate)")
    g.add_argument("--rotate-degrees", type=float, default=_default("rotate_degrees"), help=f"augmentation rotation range, degrees {_shown('rotate_degrees')}")
    g.add_argument("--zoom", type=float, default=_default("zoom"), help=f"random zoom in [1-Z, 1+Z] {_shown('zoom')}")
    g.add_argument("--translate", type=float, default=_default("translate"),
                   help=f"random shift, fraction of the side {_shown('translate')}")
    g.add_argument("--intensity", type=float, default=_default("intensity"),
                   help=f"random brightness, contrast and gamma of strength 0..1 {_shown('intensity')}")
    g.add_argument("--loss", choices=LOSSES, default=_default("loss"), help=f"{_shown('loss')}")
    g.add_argument("--label-smoothing", type=float, default=_default("label_smoothing"),
                   help=f"targets t(1-s) + s/2 {_shown('label_smoothing')}")
    g.add_argument("--mixup", type=float, default=_default("mixup"), metavar="ALPHA",
                   help=f"mixup Beta(alpha, alpha), 0: off {_shown('mixup')}")
    g.add_argument("--ema", type=float, default=_default("ema"), metavar="DECAY",
                   help=f"keep a moving average of the weights, 0: off {_shown('ema')}")
    g.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=_default("keep_best"),
                   help=f"keep the epoch with the best dev score, else the last one {_shown('keep_best')}")
    g.add_argument("--patience", type=non_negative_int, default=_default("patience"), metavar="N",
                   help=f"early stopping after N epochs without a better dev score, 0: off {_shown('patience')}")


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=_default("seed"), help=f"split, init, order, augmentation {_shown('seed')}")
    g.add_argument("--workers", dest="num_workers", type=non_negative_int, default=_default("num_workers"), metavar="N",
                   help=f"DataLoader workers {_shown('num_workers')}")
    g.add_argument("--device", default=_default("device"), help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=_default("bf16"), help="bf16 autocast on CUDA")
    g.add_argument("--checkpoint-every", type=non_negative_int, default=_default("checkpoint_every"), metavar="N",
                   help=f"write last.pt every N optimiser steps too, 0: epoch ends only {_shown('checkpoint_every')}")
    g.add_argument("--eval-batch-size", type=positive_int, default=_default("eval_batch_size"), metavar="N")
    g.add_argument("--n-boot", type=non_negative_int, default=_default("n_boot"), metavar="N",
                   help=f"bootstrap resamples for AUROC intervals {_shown('n_boot')}")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (rerun the command to resume)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a parsed `medimaging train` command line describes."""
    import dataclasses

    from common.train_config import recipe_defaults

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}  # None: not given
    values["data"] = list(args.data or [])
    values["split_fractions"] = tuple(values["split_fractions"])
    recipe = recipe_defaults(getattr(args, "recipe", "study"), values["data"], values.get("pretrained", False))
    return TrainConfig(**{**recipe, **values})


def run(args: argparse.Namespace) -> int:
    import os

    from common.io import load_json
    from common.labelfiles import strict_labels
    from common.metrics import format_table
    from common.runs import METRICS_JSON
    from common.train import fit

    cfg = config_from_args(args).validate()
    from common.train_config import uses_small_data_recipe

    if uses_small_data_recipe(args.recipe, cfg.data, cfg.pretrained) and int(os.environ.get("RANK", "0")) == 0:
        print(f"small-data recipe (real data, no pretrained weights; --recipe study for the study's settings): "
              f"{cfg.model_name}, {cfg.in_chans} channel(s), {cfg.image_size} px, {cfg.epochs} epochs, EMA {cfg.ema}")
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
