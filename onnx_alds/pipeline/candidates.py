"""``objective="best"``: candidate plans built and judged on the calibration data.

The exact solvers optimise a proxy (each layer's error: its max, or its sum); this measures what
the user sees.  The min-max plan, the min-sum plan and the uniform plan at the same budget (same
error model, same speed guard) are each emitted and run on the validation inputs (held-out
calibration samples: a plan is not judged on the data it was fitted on), and the one with the
lowest worst-output relative L2 is kept, with its build (it is not built again); the report's
method names the plan written.
"""

from __future__ import annotations

import logging

from ..errors import InfeasibleBudget
from ..io import Source
from ..validate import validate
from .attempt import Choice
from .stages import Run, build, choose

log = logging.getLogger(__name__)

MEASURED_CANDIDATES = (("alds", "max"), ("alds", "sum"), ("uniform", "max"))


def score(run: Run, choice: Choice) -> float:
    """Build ``choice`` as the rewrite builds it (with the sequential refit where it is on) and return
    its worst output relative L2 on the calibration inputs (nothing is timed); the build is kept on
    the choice."""
    choice.built = build(run, choice, Source.load(run.original))
    return validate(run.original, choice.built.model, provider=run.opts.validation.provider,
                    input_shapes=run.info.input_shapes, feeds=run.cal_data, repeats=0,
                    output_kinds=run.opts.validation.output_kinds).rel_l2


def choose_measured(run: Run, *, metric: str, fraction: float, guard=None) -> Choice:
    """The candidate with the lowest output error on the calibration data; the baselines are the
    min-max solve's, and the budget section names every candidate's error."""
    tried, best, baselines = [], None, None
    for i, (method, objective) in enumerate(MEASURED_CANDIDATES):
        try:
            got = choose(run, metric=metric, fraction=fraction, guard=guard, method=method, objective=objective,
                         compare=run.opts.selection.compare and i == 0)
        except InfeasibleBudget:
            if i == 0:
                raise  # the min-max plan is the most permissive: nothing else can meet the budget
            continue
        baselines = got.baselines if baselines is None else baselines
        with run.stage("candidates"):
            err = score(run, got)
        tried.append({"method": method, "objective": objective, "rel_l2": err})
        if best is None or err < best[0]:
            best = (err, f"{method}/{objective}", got)
    _, picked, kept = best
    kept.baselines = baselines  # kept.method names the plan written (alds, or uniform where that won)
    kept.budget.update(objective="best", picked=picked, candidates=tried)
    kept.plan.budget.update(objective="best", picked=picked)
    log.info("candidate plans on the calibration data: %s; kept %s",
             ", ".join(f"{t['method']}/{t['objective']} {t['rel_l2']:.4g}" for t in tried), picked)
    return kept
