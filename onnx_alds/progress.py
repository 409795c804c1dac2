"""Progress for people and for pipeline logs.

``progress_iter(it, total=..., desc=..., enabled=...)`` wraps an iterable:
on a terminal it is a tqdm bar; otherwise (stderr redirected to a log) it
writes ``logging`` lines on the ``onnx_alds.progress`` logger: one every
:data:`STEP` of the stage once it has run :data:`QUIET_S` seconds (stage,
items done, elapsed, estimate left) and one when the stage ends.  Nothing at
all when ``enabled`` is false (``-q``, or a library caller that did not ask).
:class:`Progress` is the same for work counted by hand (``update(n)``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

log = logging.getLogger("onnx_alds.progress")

QUIET_ENV = "ONNX_ALDS_PROGRESS_QUIET_S"


def _quiet_s(default: float = 2.0) -> float:
    try:
        v = float(os.environ.get(QUIET_ENV, default))
    except ValueError:
        return default
    return v if math.isfinite(v) and v >= 0 else default


STEP = 0.05  # a log line every 5 % of a stage ...
QUIET_S = _quiet_s()  # ... once it has run this long; a short stage writes only its closing line


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A stage's progress: a tqdm bar on a terminal, periodic log lines otherwise."""

    def __init__(self, total: int | None, desc: str, unit: str = "item", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.t0, self._next = 0, time.perf_counter(), STEP
        self.bar = None
        if enabled and _tty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        elif enabled:
            log.setLevel(logging.INFO)  # the CLI's handler shows warnings only; progress asked for is shown

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.enabled or not self.total:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.t0
        if frac >= self._next and self.done < self.total:
            self._next = (int(frac / STEP) + 1) * STEP
            if elapsed >= QUIET_S:
                left = elapsed * (1 - frac) / frac
                log.info("%s: %d/%d %s (%.0f %%), %.1f s elapsed, about %.0f s left", self.desc, self.done,
                         self.total, self.unit, 100 * frac, elapsed, left)

    def set_total(self, total: int | None) -> None:
        """The stage's size, once it is known (a stream counted by its first pass)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self, done: bool = True) -> None:
        """End the stage; its closing line says it is done unless ``done`` is false (it failed)."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and done:
            log.info("%s: %d %s done in %.1f s", self.desc, self.done, self.unit,
                     time.perf_counter() - self.t0)
        self.enabled, self.bar = False, None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(done=exc_type is None)  # a stage cut short by an error is not reported as done


def progress_iter(iterable, *, total: int | None = None, desc: str, unit: str = "item", enabled: bool = True):
    """Yield the items of ``iterable``, reporting progress as :class:`Progress` does."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    with Progress(total, desc, unit, enabled) as p:
        for item in iterable:
            yield item
            p.update(1)
