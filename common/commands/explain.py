"""`medimaging explain`: a Grad-CAM overlay showing where the model looked for one finding.

    medimaging explain image.png --run runs/all14 --label Cardiomegaly --out heat.png

The overlay is drawn on the original image at full resolution, with the label and probability in
the title (and SYNTHETIC when the run was trained on synthetic data). Without --label, the most
probable finding is explained. See common.explain.
"""
from __future__ import annotations

import argparse
import sys

from common.commands._types import unit_interval

HELP = "Grad-CAM overlay for one image and finding (full resolution, probability in the title)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from common.labels import LABELS

    p.add_argument("image", metavar="IMAGE", help="the X-ray image file")
    p.add_argument("--run", required=True, metavar="RUN", help="a run directory (or an export folder: ONNX for CNNs)")
    p.add_argument("--label", default=None, metavar="LABEL",
                   help=f"the finding to explain, one of the run's labels ({', '.join(LABELS)}); default: the most probable")
    p.add_argument("--out", default="heat.png", metavar="PNG", help="output image (default: heat.png)")
    p.add_argument("--alpha", type=unit_interval, default=0.4, help="heatmap opacity in [0, 1] (default: 0.4)")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map (default: jet)")


def run(args: argparse.Namespace) -> int:
    from common.explain import explain
    from common.images import UnreadableImage
    from common.predict import load_predictor

    try:
        predictor = load_predictor(args.run)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"medimaging explain: {err}", file=sys.stderr)
        return 2
    try:
        e = explain(predictor, args.image, args.label)
    except UnreadableImage as err:
        print(f"medimaging explain: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"medimaging explain: {err}", file=sys.stderr)
        return 2
    try:
        path = e.save(args.out, alpha=args.alpha, cmap=args.cmap)
    except (KeyError, ValueError) as err:  # an unknown colour map name
        print(f"medimaging explain: {err}", file=sys.stderr)
        return 2
    print(f"{path}: {e.title}")
    return 0
