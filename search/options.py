"""Checked numbers for command-line options (argparse ``type=``): a value out of range ends
in argparse's own ``error: argument --OPTION: ...`` line and exit status 2, before any work.

Standard library only: ``spt --help`` must not load torch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)

# The plot limits of analysis.style (not imported: the analysis package loads torch); a test checks they agree.
MAX_INCHES = 50.0
DPI_RANGE = (10.0, 1200.0)
MAX_FONT_POINTS = 72.0

SEED_LIMIT = 2**32  # NumPy's and Optuna's samplers take seeds in [0, 2**32)


def valid_seed(value: int) -> bool:
    """Whether ``value`` is a seed every sampler takes (the one rule for --seeds, seed, compare.seeds)."""
    return 0 <= value < SEED_LIMIT


def checked(cast: Callable[[str], T], accept: Callable[[T], bool], rule: str) -> Callable[[str], T]:
    """An argparse ``type=`` that reads ``cast(text)`` and refuses values ``accept`` rejects,
    with ``"<rule>, got <text>"`` as argparse's message."""

    def parse(text: str) -> T:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    parse.__name__ = rule
    return parse


positive_int = checked(int, lambda v: v >= 1, "must be a whole number of at least 1")
nonneg_int = checked(int, lambda v: v >= 0, "must be a whole number, 0 or more")
seed_int = checked(int, valid_seed, f"must be a whole number in [0, {SEED_LIMIT - 1}]")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0")
inches = checked(float, lambda v: 0 < v <= MAX_INCHES, f"must be in (0, {MAX_INCHES:g}] inches")
dots_per_inch = checked(float, lambda v: DPI_RANGE[0] <= v <= DPI_RANGE[1],
                        f"must be in [{DPI_RANGE[0]:g}, {DPI_RANGE[1]:g}] dots per inch")
font_points = checked(float, lambda v: 0 < v <= MAX_FONT_POINTS, f"must be in (0, {MAX_FONT_POINTS:g}] points")
