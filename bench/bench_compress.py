"""Compression benchmark: fp32 vs int8 (ONNX Runtime static QDQ, per-channel), pruning, a small student.

    .venv/bin/python bench/bench_compress.py [--threads 2] [--size 224] [--models resnet50,...]
                                             [--student mobilenetv3_small_100 --student-size 160]

Random-initialised models (the ratios of size and speed do not depend on what was learnt; AUROC
is not measured here: see notebooks/compression.ipynb for trained runs). For each backbone: an
untrained run (`common.predict.create_untrained_run`), exported with `common.export` (fp32 and
int8 calibrated on real NIH images), timed by `common.compress.measure_table` in a fresh torch-free
process per model: batch 1, --threads intra-op threads, model-only and end-to-end from the
1024x1024 PNG. Also ResNet-50 magnitude-pruned to 50% (unstructured) and 30% of its channels,
exported with the zeros in place, to show what pruning alone does to speed; and the student.

Prints one markdown table and the issue's size / speed targets with what was measured.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common.paths import sample_data_dir

DEFAULT_IMAGES = sample_data_dir() / "nih-sample" / "images"
DEFAULT_MODELS = "resnet50,densenet121,efficientnet_b0,mobilenetv3_large_100"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated timm names (default: {DEFAULT_MODELS})")
    ap.add_argument("--size", type=int, default=224, help="input side (default: 224)")
    ap.add_argument("--student", default="mobilenetv3_small_100", help="the small model (default: mobilenetv3_small_100)")
    ap.add_argument("--student-size", type=int, default=160, help="its input side (default: 160)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: 2)")
    ap.add_argument("--repeats", type=int, default=30, help="timed model runs per model (default: 30)")
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds; the fastest median is kept (default: 2)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="PNG folder for calibration and end-to-end")
    ap.add_argument("--no-prune", dest="prune", action="store_false", help="skip the pruned ResNet-50 rows")
    args = ap.parse_args()

    from common import compress

    images = sorted(args.images.glob("*.png"))
    if not images:
        raise SystemExit(f"{args.images}: no PNG images (set --images to a folder of X-rays)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    quiet = lambda msg: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        variants = compress.random_init_variants(tmp, models, args.size, args.student, args.student_size,
                                                 calibration_images=images[:32],
                                                 prune_model_name="resnet50" if args.prune else None, log=quiet)
        rows = compress.measure_table(variants, timing_images=images[:20], threads=args.threads, repeats=args.repeats,
                                      rounds=args.rounds, score=False, log=quiet)
    base = "efficientnet_b0 fp32" if "efficientnet_b0" in models else variants[0].name
    from PIL import Image

    with Image.open(images[0]) as im:
        w, h = im.size
    print(f"\n## Random-init models, {args.size} px, batch 1, {args.threads} threads, ONNX Runtime "
          f"(end-to-end from {w}x{h} PNGs)\n")
    print(compress.table_markdown(rows, compress.SPEED_COLUMNS))
    print()
    print(compress.targets_markdown([c for c in compress.check_targets(rows, teacher=base) if "AUROC" not in c["target"]]))


if __name__ == "__main__":
    main()
