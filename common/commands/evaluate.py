"""`medimaging evaluate`: score a predictions CSV against a label file.

    medimaging evaluate --predictions runs/stage2/test_predictions.csv \\
        --labels dataset_full/Data_Entry_2017_v2020.csv --json runs/stage2/eval.json \\
        --thresholds runs/stage2/thresholds.json

The files it reads and which labels it evaluates: `common.evaluate`, which does the work; this
module parses the arguments and prints. It imports `common.evaluate` (pandas, scikit-learn) in
`run` only, so building the `medimaging` parser stays light.
"""
from __future__ import annotations

import argparse
import sys

from common.commands._types import non_negative_int
from common.labels import TASKS

HELP = "score a predictions CSV (image names + one probability per label) against a label file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, metavar="P.csv",
                   help="CSV with a column of image file names and one probability column per label "
                        "(named as the label or prob_<label>), as `medimaging predict --csv` writes it")
    p.add_argument("--labels", required=True, metavar="L",
                   help="NIH Data_Entry csv, 14_train.csv, cardiomegaly csv or dataset folder")
    p.add_argument("--json", metavar="OUT", default=None, help="write all metrics to this JSON file")
    p.add_argument("--thresholds", metavar="T.json", default=None,
                   help="per-label thresholds for sensitivity/specificity/F1 (e.g. a run's thresholds.json; default 0.5)")
    p.add_argument("--label", dest="label_names", action="append", metavar="NAME", default=None,
                   help="evaluate this label (repeatable); each must have a prediction column")
    p.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="evaluate this task's labels (cardiomegaly: Cardiomegaly only; all14: the 14 findings)")
    p.add_argument("--n-boot", type=non_negative_int, default=1000, metavar="N", help="bootstrap resamples for AUROC CIs (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")


def run(args: argparse.Namespace) -> int:
    from common.evaluate import EvaluationError, evaluate_files, short_list
    from common.io import save_json
    from common.metrics import format_table

    try:
        result = evaluate_files(args.predictions, args.labels, args.thresholds, args.label_names, args.task,
                                n_boot=args.n_boot, seed=args.seed)
    except (EvaluationError, FileNotFoundError) as err:
        print(f"medimaging evaluate: error: {err}", file=sys.stderr)
        return 2
    unlabelled = [n for n in result["labels"] if result["n_labelled"][n] == 0]
    print(f"{result['n_images']} images, {len(result['labels'])} label(s); predictions {args.predictions}, "
          f"labels {args.labels}")
    print(format_table(result))
    if unlabelled:
        print(f"note: {args.labels} does not label {short_list(unlabelled)} for these images: n/a above")
    if args.json:
        save_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
