"""`medimaging reproduce`: execute every experiment notebook and write results/local/ (tables, figures)."""
from __future__ import annotations

import argparse
import sys

from common.commands._types import STRICT_HELP

# light: the notebook table and the output folder's names; papermill loads when running
from common.experiments.notebooks import DEFAULT_OUT, RESULTS_DIR, notebook_names
from common.experiments.profiles import REPRODUCE_PROFILES  # light: dataclasses and the Weights value

HELP = "execute every experiment notebook (papermill) and write OUT/tables.md, figures and executed notebooks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=REPRODUCE_PROFILES, default="quick",
                        help="quick: small variants at low resolution, ~20 min on a 2-core CPU (default); "
                             "paper: the study's settings (EfficientNet-B4 at 224, hub weights, 5 epochs; a GPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="a couple of optimiser steps per training with tiny models (tests, CI)")
    parser.add_argument("--data-full", metavar="DIR", default=None,
                        help="the 14-label dataset (NIH layout or 14_train.csv); default dataset_full/, "
                             "or the synthetic default when both data folders are empty")
    parser.add_argument("--data-cardiomegaly", metavar="DIR", default=None,
                        help="the Cardiomegaly vs No Finding dataset (train/ test/ train.csv test.csv); "
                             "default dataset_cardiomegaly/")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"output folder: notebooks/, figures/, tables/, tables.md (default {DEFAULT_OUT}/, "
                             f"ignored by git, beside the committed results of the real NIH sample in {RESULTS_DIR}/)")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help=f"run only these notebooks, in reproduce order: {', '.join(notebook_names())}")
    parser.add_argument("--runs", metavar="DIR", default=None,
                        help="the run cache (default $MEDIMAGING_RUNS, else <cache root>/runs); "
                             "finished runs with the same configuration and data are reused")
    parser.add_argument("--weights", metavar="hub|none|DIR", default=None,
                        help="pretrained weights of every backbone trained from scratch: hub (timm's hub, "
                             "needs internet), none (random initialisation) or a folder of downloaded weights, "
                             "one per model (NAME.safetensors or NAME/). Default: the profile's "
                             "(quick: none, paper: hub); also $MEDIMAGING_WEIGHTS")
    parser.add_argument("--strict", action="store_true", help=STRICT_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from common.data import DatasetError
    from common.experiments.reproduce import reproduce

    try:
        result = reproduce(
            profile=args.profile, smoke=args.smoke, data_full=args.data_full,
            data_cardiomegaly=args.data_cardiomegaly, out=args.out, only=args.only,
            runs_dir=args.runs, progress=not args.no_progress, weights=args.weights, strict=args.strict,
        )
    except (ValueError, FileNotFoundError, DatasetError) as err:
        print(f"medimaging reproduce: {err}", file=sys.stderr)
        return 2
    print(f"tables: {result.tables_md}")
    if result.failed:
        for o in result.failed:
            print(f"medimaging reproduce: notebook {o.name} failed: {o.error} (executed notebook with the "
                  f"error: {o.output})", file=sys.stderr)
        return 1
    print(f"all {len(result.outcomes)} notebook(s) ran: {', '.join(o.name for o in result.outcomes)}")
    return 0
