"""`medimaging data`: look at a dataset folder, or write the synthetic one.

    medimaging data summary DIR [DIR ...] [--json] [--strict] [--size 224] [--workers N]
    medimaging data synthetic OUT [--layout nih|cardiomegaly] [--n-images N] [--image-size 256] [--seed 0]

`summary` reads the folder (any of the three layouts), decodes every image through the image cache
(so the work is reused by training) and reports images found, rows without an image file, label
rows with problems (kept with their known findings or skipped; grouped by kind here, every one with
its file, line and reason under --json), unreadable files with their reasons, patients, and
positives per label: `common.data.summarize` does the work (its docstring lists the keys `--json`
prints), this module parses and prints. --strict refuses a label file with any problem row.
"""
from __future__ import annotations

import argparse
import json
import sys

from common.commands._types import STRICT_HELP, positive_int

HELP = "dataset tools: `summary DIR` (what is there, what is broken) and `synthetic OUT`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    s = sub.add_parser("summary", help="images, missing rows, unreadable files, patients, positives per label")
    s.add_argument("dirs", nargs="+", metavar="DIR", help="dataset folder(s) in any supported layout (combined)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    s.add_argument("--strict", action="store_true", help=STRICT_HELP)
    s.add_argument("--size", type=positive_int, default=224,
                   help="decode into the image cache at this size, so training reuses the work (default: 224)")
    s.add_argument("--workers", type=positive_int, default=None, help="decoding processes (default: all cores)")
    g = sub.add_parser("synthetic", help="write the deterministic synthetic dataset to a new folder")
    g.add_argument("out", metavar="OUT", help="folder to create (must be empty or absent)")
    g.add_argument("--layout", choices=("nih", "cardiomegaly"), default="nih", help="dataset layout (default: nih)")
    g.add_argument("--n-images", type=positive_int, default=None,
                   help="number of images (default: 800 for nih, 400 for cardiomegaly)")
    g.add_argument("--image-size", type=positive_int, default=256, help="image side in pixels (default: 256)")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files (default: 0)")
    p.set_defaults(_data_parser=p)


EXAMPLES_PER_KIND = 5  # problem rows shown per kind; --json lists every one


def format_summary(s: dict) -> str:
    """The human-readable table of `common.data.summarize`'s result, problems grouped by kind."""
    title = f"{s['dataset']} ({s['layout']} layout{', SYNTHETIC' if s['is_synthetic'] else ''})"
    counts = s.get("problem_counts", {})
    lines = [title, "=" * len(title),
             f"{'images found':<26}{s['images_found']:>9}",
             f"{'rows without image':<26}{s['rows_without_image']:>9}",
             f"{'rows skipped (problems)':<26}{s['rows_skipped']:>9}",
             f"{'rows with unknown findings':<26}{s['rows_kept_with_unknown_findings']:>9}",
             f"{'unreadable images':<26}{len(s['unreadable']):>9}",
             f"{'patients':<26}{s['patients']:>9}", "",
             f"{'label':<20}{'positives':>10}{'labelled':>10}{'prevalence':>12}"]
    for name, pos in s["positives"].items():
        n = s["labelled"][name]
        prev = f"{100.0 * pos / n:.1f}%" if n else "-"
        lines.append(f"{name:<20}{pos:>10}{n:>10}{prev:>12}")
    if s.get("problems"):
        lines += ["", "label rows with problems (each row, never the dataset; --json lists every one):"]
        for kind, n in counts.items():
            rows = [p for p in s["problems"] if p["kind"] == kind]
            lines.append(f"  {kind}: {n} row{'s' if n != 1 else ''}, {rows[0]['action']}")
            for p in rows[:EXAMPLES_PER_KIND]:
                where = f"{p['file']}, line {p['line']}" if p["line"] else p["file"]
                lines.append(f"    {where}: {p['image'] or '(no image name)'}: {p['reason']}")
            if n > EXAMPLES_PER_KIND:
                lines.append(f"    ... and {n - EXAMPLES_PER_KIND} more")
    if s["unreadable"]:
        lines += ["", "unreadable files (skipped):"]
        lines += [f"  {u['path']}: {u['reason']}" for u in s["unreadable"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from common.data import DatasetError, summarize

    if args.data_command == "summary":
        try:
            s = summarize(args.dirs, size=args.size, workers=args.workers, strict=args.strict or None)
        except DatasetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(s, indent=2) if args.json else format_summary(s))
        return 0
    if args.data_command == "synthetic":
        from common.synthetic import generate

        try:
            out = generate(args.out, layout=args.layout, n_images=args.n_images, image_size=args.image_size,
                           seed=args.seed)
        except (FileExistsError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote a SYNTHETIC {args.layout}-layout dataset to {out}")
        return 0
    args._data_parser.print_help()
    return 2
