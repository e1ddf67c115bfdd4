"""`medimaging export`: a run → ONNX (+ int8) for torch-free serving.

    medimaging export --run runs/all14                      # runs/all14/export/model.onnx + model.json
    medimaging export --run runs/all14 --int8               # + model.int8.onnx, calibrated on dev images
    medimaging export --run runs/all14 --int8 --calibration some/images/

The fp32 model is checked against torch at export (logits within 1e-4); see common.export.
"""
from __future__ import annotations

import argparse
import sys

from common.commands._types import positive_int

HELP = "export a run to ONNX (dynamic batch, preprocessing + labels + thresholds beside it); --int8 quantises"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="RUN", help="the run directory to export")
    p.add_argument("--out", default=None, metavar="DIR", help="export folder (default: RUN/export)")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx: static QDQ int8, per-channel weights (dynamic if static fails)")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="images to calibrate int8 on (default: dev-split images of the run's data)")
    p.add_argument("--n-calibration", type=positive_int, default=None, metavar="N",
                   help="calibration images to use (default: the int8 recipe's, 64)")
    p.add_argument("--opset", type=positive_int, default=None, metavar="N",
                   help="ONNX opset (default: the exporter's, currently 20 with torch's dynamo exporter)")


def run(args: argparse.Namespace) -> int:
    from common.export import ExportError, export_onnx

    try:
        out = export_onnx(args.run, args.out, int8=args.int8, calibration_images=args.calibration,
                          opset=args.opset, n_calibration=args.n_calibration)
    except (ExportError, FileNotFoundError, ValueError) as err:
        print(f"medimaging export: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0
