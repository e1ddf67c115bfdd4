"""`medimaging cache`: what the suite keeps on disk, and clearing it.

    medimaging cache [list] [--json]
    medimaging cache clear {runs,images,synthetic,all} [--older-than DAYS] [--unfinished] [--dry-run]

Three things live under the cache folder ($MEDIMAGING_CACHE, else ~/.cache/medimaging):

  images-v1/<size>px   decoded images, one memory-mapped store per image size (rebuilt on demand)
  synthetic-v1/        the embedded default dataset (regenerated on demand, byte-identical)
  runs/                finished trainings and compressions that `medimaging reproduce`, the
                       notebooks and the trainer files reuse ($MEDIMAGING_RUNS moves it); a quick
                       profile run is tens of MB, so this is the part that grows

`list` shows each entry with its size, when it was last used (a run's folder is touched each time
it is reused) and, for runs, whether it finished. `clear` deletes what it selects and says what it
freed; anything another process holds (a training in progress, an image store being written) is
skipped and reported. Everything here can be made again: clearing costs time, never results.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from common.commands._types import positive_float

HELP = "what the suite caches on disk (decoded images, synthetic data, reusable runs) and clearing it"
KINDS = ("runs", "images", "synthetic")  # common.experiments.inventory.KINDS, spelled here to keep the parser light


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    s = sub.add_parser("list", help="every cached entry with its size and when it was last used (the default)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    c = sub.add_parser("clear", help="delete cached entries (everything here can be made again)")
    c.add_argument("what", choices=(*KINDS, "all"), help="which part of the cache")
    c.add_argument("--older-than", type=positive_float, metavar="DAYS",
                   help="only entries last used more than DAYS days ago")
    c.add_argument("--unfinished", action="store_true",
                   help="only runs that never finished (interrupted trainings; not ones in progress)")
    c.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # `medimaging cache --json`


def run(args: argparse.Namespace) -> int:
    # the inventory reads the image cache and the run cache: imported when the command runs, so
    # building the parser stays light (see common.cli)
    from common.cache import cache_root
    from common.experiments.inventory import delete, format_inventory, human_bytes, inventory, select
    from common.experiments.notebooks import runs_dir

    cache, runs = cache_root(), runs_dir()
    entries = inventory(cache, runs)
    if args.cache_command in (None, "list"):
        if args.json:
            print(json.dumps({"cache": str(cache), "runs": str(runs), "entries": [asdict(e) for e in entries],
                              "total_bytes": sum(e.bytes for e in entries)}, indent=2))
        else:
            print(format_inventory(entries, cache, runs))
        return 0
    if args.unfinished and args.what not in ("runs", "all"):
        print("error: --unfinished applies to runs only: use `medimaging cache clear runs --unfinished`",
              file=sys.stderr)
        return 2
    chosen = select(entries, args.what, args.older_than, args.unfinished)
    if not chosen:
        print(f"nothing to clear ({args.what}" + (f", last used over {args.older_than:g} days ago" if args.older_than
                                                   else "") + (", unfinished" if args.unfinished else "") + ")")
        return 0
    freed, skipped = 0, 0
    for e in chosen:
        if args.dry_run:
            print(f"would delete {e.kind}/{e.name} ({human_bytes(e.bytes)})")
            freed += e.bytes
            continue
        why = delete(e)
        if why:
            skipped += 1
            print(f"kept {e.kind}/{e.name}: {why}", file=sys.stderr)
        else:
            freed += e.bytes
            print(f"deleted {e.kind}/{e.name} ({human_bytes(e.bytes)})")
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {human_bytes(freed)} in {len(chosen) - skipped} entries" + (f"; {skipped} in use, kept" if skipped
                                                                              else ""))
    return 0
