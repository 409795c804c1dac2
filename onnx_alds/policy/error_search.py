"""``--keep-latency F --max-output-error X``: the output error is the constraint, latency the objective.

The fastest rewrite found whose worst output relative L2 on the validation inputs is at most X,
searching kept-latency fractions from F (the fastest it tries) up to 1 by bisection; each probe runs
the latency closed loop (:mod:`.latency_loop`) on the one prepared run (the model is loaded,
analysed and calibrated once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from ..errors import InfeasibleBudget, ValidationFailed
from ..pipeline.attempt import Attempt
from ..pipeline.stages import Run
from .latency_loop import run_latency

log = logging.getLogger(__name__)

PROBES = 5  # bisection steps between F and 1


@dataclass
class SearchState:
    max_error: float
    tried: list = field(default_factory=list)  # (fraction, output error)

    def probe(self, run: Run, fraction: float) -> Attempt | None:
        """The closed loop at ``fraction``: its rewrite where it keeps the error bound, else None."""
        probe_run = replace(run, opts=run.opts.with_budget(keep_latency=fraction), timings=dict(run.timings))
        probe_run.fresh_source()
        try:
            attempt = run_latency(probe_run)
        except InfeasibleBudget:
            return None
        self.tried.append((fraction, attempt.rel_l2))
        return attempt if attempt.rel_l2 <= self.max_error else None


def fastest_within(run: Run) -> Attempt:
    """The search of the module's docstring; :class:`ValidationFailed` when even the least compression
    exceeds X."""
    fraction, max_error = run.opts.budget.keep_latency, run.opts.validation.max_output_error
    state = SearchState(max_error)
    best = state.probe(run, fraction)
    lo, hi = fraction, 1.0
    for _ in range(PROBES if best is None else 0):
        mid = (lo + hi) / 2
        got = state.probe(run, mid)
        if got is not None:
            best, hi = got, mid
        else:
            lo = mid
    if best is None:
        shown = ", ".join(f"{f:.3f}: {e:.3g}" for f, e in state.tried) or "none feasible"
        raise ValidationFailed(f"no rewrite with --keep-latency between {fraction:g} and 1 keeps the output error "
                               f"within --max-output-error {max_error:g} (kept latency: error {shown}); "
                               f"nothing was written")
    best.choice.budget["error_bound"] = {"max_output_error": max_error, "tried": [list(t) for t in state.tried]}
    return best
