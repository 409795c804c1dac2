"""``--keep-latency F``'s second route, where the latency table's plans measured short of ``1/F``.

On small models a layer's time is a few µs, and timed alone it says little of the layer inside the
model.  The speed guard's per-MAC and per-node model is measured on this provider and keeps the
default rewrite faster than its input: its plans at keep-params :data:`GUARDED_FRACTIONS` (with the
user's method and objective) are each built and timed against the original, side by side.  The
first (the most parameters kept, so the least error) that meets the target is kept or, where none
does, the first within 5 % of the fastest of them (closer is this machine's noise), if it beats the
table's best.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import InfeasibleBudget
from ..io import Source
from ..pipeline.attempt import Attempt, Built, Choice, LatencyMeasurement
from ..pipeline.stages import Run, build, check, choose, measure, speed_guard

log = logging.getLogger(__name__)

GUARDED_FRACTIONS = (0.9, 0.7, 0.5, 0.3)  # these keep-params plans, in turn
ROUTE_TOLERANCE = 0.05  # a plan measured this close to the target meets it, as in the closed loop


@dataclass
class Tried:
    fraction: float
    choice: Choice
    built: Built
    source: Source
    latency: LatencyMeasurement


@dataclass
class RouteState:
    target: float
    tried: list = field(default_factory=list)

    def pick(self, beat: float) -> Tried | None:
        if not self.tried or max(t.latency.speedup for t in self.tried) <= beat:
            return None
        enough = min(self.target, (1 - ROUTE_TOLERANCE) * max(t.latency.speedup for t in self.tried))
        return next(t for t in self.tried if t.latency.speedup >= enough)


def guarded_alternative(run: Run, table, *, beat: float) -> Attempt | None:
    """The second route (see the module's docstring): the kept attempt, validated, or None."""
    keep = run.opts.budget.keep_latency
    guard = speed_guard(run.opts.validation.provider)
    if guard is None:
        return None
    state = RouteState((1 - ROUTE_TOLERANCE) / keep)
    for kp in GUARDED_FRACTIONS:
        run.fresh_source()
        try:
            choice = choose(run, metric="params", fraction=kp, guard=guard, compare=False)
        except InfeasibleBudget:
            continue
        if not choice.decomposed:
            continue
        built = build(run, choice)
        got = measure(run, built.model, table, choice.choices)
        log.info("keep-latency %g: the speed guard's plan at keep-params %g measured %.2fx", keep, kp, got.speedup)
        state.tried.append(Tried(kp, choice, built, run.source, got))
        if got.speedup >= state.target:
            break
    best = state.pick(beat)
    if best is None:
        return None
    choice = best.choice
    predicted_ms = table.predicted_ms(choice.choices)
    choice.predicted_ms = predicted_ms if np.isfinite(predicted_ms) else float("nan")  # a rank the table did not time
    choice.budget.update(metric="latency", fraction=keep, target=keep * table.model_ms, predicted=choice.predicted_ms,
                         total_before=table.model_ms, route=f"speed guard, keep-params {best.fraction:g}",
                         beta=table.beta, rounds=1)
    choice.budget.update(table.summary(choice.predicted_ms))
    # the plan file says the budget it was kept for (a latency budget, by this route), as the table's plans do
    choice.plan.budget.update(metric="latency", fraction=keep, route=choice.budget["route"])
    # measured once more in check, on purpose: the plan kept is the one that measured well, and a fresh
    # measurement of it is what the report and the verdict judge
    run.source = best.source
    return check(run, choice, best.built, table)
