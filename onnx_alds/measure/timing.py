"""The one timing primitive: runs in alternation, timed with ``perf_counter``.

Everything that divides one measured time by another (validation's speed-up,
``bench``, the latency table's probes, the closed loop, the profiler's wall
times) goes through :func:`timed_runs`, so that the figures it divides are
taken the same way: warm-up runs first, then each run timed in turn, the
starting run alternating, until every run has ``repeats`` samples and (up to
``max_repeats``) ``min_seconds`` of them; ``blocks`` > 1 keeps each run's
fastest block by median (load only ever adds time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..runtime import ort

TIMING_SECONDS = 0.25  # validation times each model for at least this long
TIMING_BLOCKS = 3  # in this many blocks, each model's fastest kept (:func:`timed_runs`)


def timed_runs(runs: Sequence[Callable[[], object]], *, warmup: int = 3, repeats: int = 20,
               min_seconds: float = 0.0, max_repeats: int = 2000, blocks: int = 1,
               order_log: list | None = None) -> list[list[float]]:
    """Time each zero-argument ``run`` ``repeats`` times, alternating between them after ``warmup``
    untimed calls of each, and go on (up to ``max_repeats``) until every run has taken
    ``min_seconds``: a 0.2 ms model timed 20 times is 4 ms of samples, which one burst of load on a
    shared machine moves.  Returns the times in ms per run.

    ``blocks`` > 1 splits that into as many blocks, timed one after the other (``repeats`` and
    ``min_seconds`` shared among them), and returns for each run the times of its fastest block (by
    median).  On the shipped ResNet20 against a rewrite, ten fresh pairs of sessions measured
    1.06–1.30x as one block and 1.18–1.32x as three."""
    if blocks > 1:
        parts = [timed_runs(runs, warmup=warmup if b == 0 else 1, repeats=max(1, -(-repeats // blocks)),
                            min_seconds=min_seconds / blocks, max_repeats=max_repeats, order_log=order_log)
                 for b in range(blocks)]
        return [min((part[i] for part in parts), key=np.median) for i in range(len(runs))]
    for _ in range(warmup):
        for i, run in enumerate(runs):
            run()
            if order_log is not None:
                order_log.append(("warmup", i))
    times: list[list[float]] = [[] for _ in runs]
    r = 0
    while r < repeats or (r < max_repeats and min(sum(t) for t in times) < min_seconds * 1e3):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))  # neither always first
        for i in order:
            t0 = time.perf_counter()
            runs[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
            if order_log is not None:
                order_log.append(("timed", i))
        r += 1
    return times


def plain_run(sess, feeds) -> Callable[[], object]:
    """A whole-model run as a user makes it: numpy in, numpy out."""
    return lambda: sess.run(None, feeds)


def bound_run(sess, feeds) -> Callable[[], object]:
    """A run with inputs and outputs bound on the session's device (IOBinding), so that copying
    inputs in and outputs out to numpy, which a layer inside a model never does, is not timed."""
    rt = ort()
    device = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, rt.OrtValue.ortvalue_from_numpy(arr, device, 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device)
    return lambda: sess.run_with_iobinding(binding)


def interleaved_latency(sessions, feeds_list, *, warmup: int = 3, repeats: int = 20,
                        order_log: list | None = None, min_seconds: float = 0.0,
                        max_repeats: int = 2000, blocks: int = 1) -> list[list[float]]:
    """Whole sessions timed in alternation (:func:`timed_runs` of their :func:`plain_run`); ms per
    session."""
    return timed_runs([plain_run(s, f) for s, f in zip(sessions, feeds_list)], warmup=warmup, repeats=repeats,
                      min_seconds=min_seconds, max_repeats=max_repeats, blocks=blocks, order_log=order_log)


def time_session(sess, feeds, *, warmup: int = 3, repeats: int = 15, min_seconds: float = 0.02,
                 max_repeats: int = 1000) -> float:
    """Median ms of one session's bound run (:func:`bound_run`): at least ``repeats`` runs, and more
    (up to ``max_repeats``) until they add up to ``min_seconds``: 15 runs of a 0.1 ms layer are
    1.5 ms of samples."""
    ts = timed_runs([bound_run(sess, feeds)], warmup=warmup, repeats=repeats, min_seconds=min_seconds,
                    max_repeats=max_repeats)[0]
    return float(np.median(ts))
