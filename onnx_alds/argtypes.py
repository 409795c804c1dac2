"""argparse types shared by every subcommand: numbers are checked where they
are parsed, so NaN, infinities and out-of-range bounds are a usage error
(exit 2) for every float option alike."""

from __future__ import annotations

import argparse
import math


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False):
    """An argparse ``type`` accepting finite floats in the interval from
    ``lo`` to ``hi`` (either end open or absent).  ``nan``, ``inf`` and
    ``-inf`` are refused whatever the interval."""

    def interval() -> str:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        return f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = lo is not None and (v <= lo if lo_open else v < lo)
        above = hi is not None and (v >= hi if hi_open else v > hi)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is outside {interval()}")
        return v

    parse.__name__ = "number"  # argparse names the type in its own messages
    return parse


MAX_THREADS = 1024  # a thread count past this is a typo (torch segfaults creating 100,000)


def bounded_int(lo: int | None = None, hi: int | None = None):
    """An argparse ``type`` accepting integers from ``lo`` to ``hi`` (inclusive)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text} is outside [{'-inf' if lo is None else lo}, "
                                             f"{'inf' if hi is None else hi}]")
        return v

    parse.__name__ = "integer"
    return parse


fraction = finite_float(0.0, 1.0, lo_open=True)  # a kept fraction, in (0, 1]
positive = finite_float(0.0, lo_open=True)
non_negative = finite_float(0.0)


def check_names(flag: str, given, names, kind: str, what: str = "the model") -> None:
    """One sentence (a usage error) where ``flag`` names an ``kind`` (input, output) that ``names`` lacks:
    a misspelt name would otherwise be ignored without a word (``--input-shape``, ``--output-kind``)."""
    from .errors import UsageError

    names = list(dict.fromkeys(names))
    for name in given or {}:
        if name not in names:
            raise UsageError(f"{flag} names {name!r}, which is not an {kind} of {what} (its {kind}s: "
                             f"{', '.join(names) or 'none'})")
