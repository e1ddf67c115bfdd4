"""`medimaging predict`: findings for images or folders, with a run (torch) or its ONNX export.

    medimaging predict image.png --run runs/all14                  # one line per image
    medimaging predict images/ --run runs/all14 --csv preds.csv    # what `medimaging evaluate` reads
    medimaging predict a.png b.jpg --run runs/all14 --onnx --json  # JSON lines, no torch imported

--json prints JSON lines: one object per image and line, {"image", "probabilities": {label: p},
"positive": [labels at/above the run's tuned threshold]}. --csv writes `Image Index` + one
probability column per label. Unreadable files get a warning line each on stderr and are skipped;
the exit status is 0 unless no image could be read (1) or the run could not be loaded (2).
"""
from __future__ import annotations

import argparse
import sys

from common.commands._types import positive_int

HELP = "predict the 14 findings for images or folders with a run or its ONNX export"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (searched recursively)")
    p.add_argument("--run", required=True, metavar="RUN",
                   help="a run directory (torch) or an export folder from `medimaging export` (ONNX Runtime)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON lines: one {image, probabilities, positive} per image")
    out.add_argument("--csv", metavar="OUT", default=None,
                     help="write `Image Index` + one probability column per label (the format `medimaging evaluate` reads)")
    p.add_argument("--onnx", action="store_true",
                   help="predict with ONNX Runtime (RUN/export, or RUN itself if it is an export folder); never imports torch")
    p.add_argument("--int8", action="store_true", help="with --onnx: use the int8 model (model.int8.onnx)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per model call (default: 16)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="ONNX Runtime intra-op threads (default: the CPU count)")
    p.add_argument("--device", default="cpu", help="torch device without --onnx (default: cpu)")


def _summary(pred, top: int = 3) -> str:
    ranked = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[:top]
    found = ", ".join(pred.positive) if pred.positive else "none above threshold"
    return f"{pred.image}: {found}  [top: {', '.join(f'{k} {v:.3f}' for k, v in ranked)}]"


def run(args: argparse.Namespace) -> int:
    from common.predict import load_predictor
    from common.serving import expand_inputs, is_onnx_dir, prediction_json, write_predictions_csv

    onnx = args.onnx or args.int8 or is_onnx_dir(args.run)
    try:
        if onnx:
            predictor = load_predictor(args.run, onnx=True, int8=args.int8, threads=args.threads)
        else:
            predictor = load_predictor(args.run, device=args.device)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"medimaging predict: {err}", file=sys.stderr)
        return 2

    if getattr(predictor, "stale", False):
        print(f"warning: {predictor.source} is older than its run's weights; re-export with "
              f"`medimaging export --run {predictor.meta.get('run_dir')}`", file=sys.stderr)
    files, bad = expand_inputs(args.inputs)
    for path, reason in bad:
        print(f"warning: {path}: {reason}; skipped", file=sys.stderr)
    done, unreadable = [], 0
    for path, pred, reason in predictor.iter_predict(files, batch_size=args.batch_size, progress=len(files) > 1):
        if pred is None:
            unreadable += 1
            print(f"warning: {path}: {reason}; skipped", file=sys.stderr)
            continue
        done.append(pred)
        if args.json:
            print(prediction_json(pred), flush=True)
        elif not args.csv:
            print(_summary(pred), flush=True)
    if args.csv:
        n = write_predictions_csv(done, predictor.labels, args.csv)
        print(f"wrote {n} prediction(s) to {args.csv}", file=sys.stderr)
    if not done:
        print(f"medimaging predict: no readable image among {len(files) + len(bad)} input(s)", file=sys.stderr)
        return 1
    if unreadable or bad:
        print(f"{len(done)} image(s) predicted, {unreadable + len(bad)} skipped", file=sys.stderr)
    return 0
