"""`medimaging` command line (also `python -m common`).

Each subcommand lives in `common/commands/<name>.py` and defines `HELP`, `add_arguments(parser)`
and `run(args) -> int`. Command modules import nothing heavy at module level: building the parser
imports all of them, and `medimaging predict --onnx` must start fast and never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.io import WriteError

# name -> module under common.commands, in the order `--help` lists them.
COMMANDS = {
    "data": "data",
    "pretrain": "pretrain",
    "train": "train",
    "evaluate": "evaluate",
    "predict": "predict",
    "explain": "explain",
    "export": "export",
    "compress": "compress",
    "reproduce": "reproduce",
    "cache": "cache",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medimaging",
        description="Chest X-ray disease detection on NIH ChestX-ray14.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"common.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except WriteError as err:  # a full disk or a read-only folder: the message names the file and what to do
        print(f"error: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
