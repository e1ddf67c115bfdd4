"""`medimaging compress`: turn a trained run into a smaller or faster model.

    medimaging compress --run runs/all14 --method int8                       # ONNX export folder, int8
    medimaging compress --run runs/all14 --method prune --sparsity 0.5       # pruned + fine-tuned run
    medimaging compress --run runs/all14 --method prune --sparsity 0.3 --structured
    medimaging compress --run runs/all14 --method distill --student mobilenetv3_small_100 --student-image-size 160

int8 writes an export folder (serve it with `medimaging predict IMAGE --run OUT --onnx --int8`);
prune and distill write normal run directories (predict, evaluate, export, the app), each with
compression.json saying what was done and what was measured. Rerunning a prune or distill
command with the same --out resumes its fine-tune.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from common import compress  # light: each compress module loads when one of its names is used
from common.commands._types import non_negative_int, open_fraction, positive_float, positive_int

HELP = "compress a run: int8 quantisation, magnitude pruning + fine-tune, or distillation into a smaller model"

METHODS = ("int8", "prune", "distill")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="RUN", help="the trained run directory to compress")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="int8: ONNX Runtime static int8 (QDQ, per-channel, calibrated on dev images); "
                        "prune: magnitude pruning + short fine-tune; distill: train a smaller student")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: beside RUN, e.g. RUN-int8, RUN-prune50, RUN-distill-NAME)")
    g = p.add_argument_group("int8")
    g.add_argument("--calibration", metavar="DIR_OR_IMAGE", action="append", default=None,
                   help="calibration images (default: the run's dev-split images)")
    g.add_argument("--n-calibration", type=positive_int, default=None, metavar="N",
                   help="calibration images used (default: the int8 recipe's, 64)")
    g = p.add_argument_group("prune")
    g.add_argument("--sparsity", type=open_fraction, default=None, metavar="S",
                   help="share of prunable weights (or, --structured, of output channels) set to zero, e.g. 0.5")
    g.add_argument("--structured", action="store_true",
                   help="prune whole conv output channels by their L1/L2 norm instead of single weights")
    g.add_argument("--scope", choices=("global", "layer"), default="global",
                   help="unstructured: rank weights across all layers (global) or within each layer (default: global)")
    g.add_argument("--norm", type=int, choices=(1, 2), default=1, help="structured: channel norm, L1 or L2 (default: 1)")
    g = p.add_argument_group("distill")
    g.add_argument("--student", metavar="NAME", default=None,
                   help="student backbone, any timm name (default: mobilenetv3_small_100)")
    g.add_argument("--student-image-size", type=positive_int, default=None, metavar="N",
                   help="student input side in pixels (default: the teacher's)")
    g.add_argument("--temperature", type=positive_float, default=2.0, metavar="T",
                   help="softens both models' sigmoid outputs in the soft-target term (default: 2)")
    g.add_argument("--alpha", type=float, default=0.5, metavar="A",
                   help="weight of the soft-target term next to the labels' BCE (default: 0.5)")
    g = p.add_argument_group("fine-tune / student training (prune, distill)")
    g.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                   help="prune: default 1; distill: default the teacher's")
    g.add_argument("--max-steps", type=non_negative_int, default=None, metavar="N",
                   help="stop after N optimiser steps (0 with prune: no fine-tune, score the pruned weights)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="prune: default a tenth of the run's; distill: default the run's")
    g.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="default: the run's")
    g.add_argument("--data", action="append", metavar="DIR", default=None,
                   help="dataset folder(s) (default: the run's own); the patient split stays the run's")
    g.add_argument("--device", default=None, help="auto, cpu, cuda ... (default: the run's)")
    g.add_argument("--workers", dest="num_workers", type=non_negative_int, default=None, metavar="N",
                   help="DataLoader workers (default: the run's)")
    g.add_argument("--no-export", dest="export", action="store_false",
                   help="prune / distill: skip the ONNX export (and its sparsity check) of the result")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print compression.json instead of a summary")


def default_out(run: str, method: str, sparsity: float | None = None, structured: bool = False,
                student: str | None = None) -> str:
    """RUN-int8, RUN-prune50[-channels], RUN-distill-STUDENT: beside the source run."""
    from pathlib import Path

    base = Path(run.rstrip("/\\"))
    if method == "int8":
        suffix = "int8"
    elif method == "prune":
        suffix = f"prune{round(100 * (sparsity or 0))}" + ("-channels" if structured else "")
    else:
        suffix = f"distill-{student}"
    return str(base.with_name(f"{base.name}-{suffix}"))


def _misused(args: argparse.Namespace) -> str | None:
    """Options given for another method: an error, not silently ignored."""
    only = {
        "prune": [("--sparsity", args.sparsity is not None), ("--structured", args.structured),
                  ("--scope", args.scope != "global"), ("--norm", args.norm != 1)],
        "distill": [("--student", args.student is not None), ("--student-image-size", args.student_image_size is not None),
                    ("--temperature", args.temperature != 2.0), ("--alpha", args.alpha != 0.5)],
        "int8": [("--calibration", args.calibration is not None), ("--n-calibration", args.n_calibration is not None)],
    }
    training = [("--epochs", args.epochs is not None), ("--max-steps", args.max_steps is not None),
                ("--lr", args.lr is not None), ("--batch-size", args.batch_size is not None),
                ("--data", args.data is not None), ("--device", args.device is not None),
                ("--workers", args.num_workers is not None), ("--no-export", not args.export)]
    only["prune"] += training
    only["distill"] += training
    for method, options in only.items():
        if method == args.method:
            continue
        given = [name for name, used in options if used and not any(
            name == n for n, _ in only[args.method])]
        if given:
            return f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to --method {method}"
    if args.method == "prune" and args.sparsity is None:
        return "--method prune needs --sparsity S (e.g. 0.5)"
    if args.method == "distill" and args.alpha < 0:
        return f"--alpha must be >= 0, got {args.alpha}"
    return None


def _compress(args: argparse.Namespace, out: str, student: str, train: dict):
    if args.method == "int8":
        calib = args.calibration if args.calibration else None
        return compress.quantize_run(args.run, out, calibration_images=calib, n_calibration=args.n_calibration)
    if args.method == "prune":
        tune = compress.FineTune(epochs=args.epochs or 1, max_steps=args.max_steps, lr=args.lr, data=args.data,
                                 export=args.export)
        return compress.prune_run(args.run, out, args.sparsity, structured=args.structured, scope=args.scope,
                                  norm=args.norm, tune=tune, **train)
    tune = compress.FineTune(epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, data=args.data,
                             export=args.export)
    return compress.distill_run(args.run, out, student=student, student_image_size=args.student_image_size,
                                temperature=args.temperature, alpha=args.alpha, tune=tune, **train)


def run(args: argparse.Namespace) -> int:
    problem = _misused(args)
    if problem:
        print(f"medimaging compress: error: {problem}", file=sys.stderr)
        return 2
    student = args.student or compress.DEFAULT_STUDENT
    out = args.out or default_out(args.run, args.method, args.sparsity, args.structured, student)
    train = {k: getattr(args, k) for k in ("batch_size", "device", "num_workers") if getattr(args, k) is not None}
    train["progress"] = args.progress
    # --json: stdout carries the report alone; the training log (printed to stdout) goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = _compress(args, out, student, train)
    report = compress.read_report(result) or {}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.method}: {result}")
    if args.method == "int8":
        print(f"  {report['int8_mb']:.2f} MB int8 vs {report['fp32_mb']:.2f} MB fp32 ({report['size_ratio']}x smaller)")
        print(f"  serve: {report['serve']}")
    elif args.method == "prune":
        s = report["safetensors"]
        print(f"  {s['pruned_sparsity']:.2%} of the prunable weights are zero in best.safetensors "
              f"({s['overall_sparsity']:.2%} of all parameters)")
        if "onnx" in report:
            print(f"  {report['onnx']['weight_sparsity']:.2%} of the ONNX weight values are zero")
    else:
        print(f"  student {report['student']} at {report['student_image_size']} px, distilled from {report['teacher']}")
    print(f"  predict: medimaging predict IMAGE --run {result}" + (" --onnx --int8" if args.method == "int8" else ""))
    return 0
