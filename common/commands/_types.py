"""argparse value types shared by the subcommands: a bad value is a usage error that says why."""
from __future__ import annotations

import argparse


def _number(text: str, kind, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a number > 0")


def open_fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v < 1.0, "a number between 0 and 1 (exclusive)")


def unit_interval(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


STRICT_HELP = ("refuse a label file with any problem row (an unknown finding, a malformed row) instead of "
               "keeping or skipping such rows")
