"""``objective="best"``: candidate plans built and judged on the calibration data.

The exact solvers optimise a proxy (each layer's error: its max, or its sum); this measures what
the user sees.  The min-max plan, the min-sum plan and the uniform plan at the same budget (same
error model, same speed guard) are each emitted and run on the validation inputs (held-out
calibration samples: a plan is not judged on the data it was fitted on), and the one with the
lowest worst-output relative L2 is kept, with its build (it is not built again); the report's
method names the plan written.

The candidates are judged with one-shot data-aware factors.  Where a sequential refit is due
(:func:`.stages.use_sequential`), only the plan picked is refitted, one sweep instead of one per
candidate, and the refit is kept where it does better on the validation inputs than the one-shot
factors, or where the user asked for it (``--sequential``): on a sentence encoder the refit
lowered the error on the samples it was fitted on and raised it on new ones.
"""

from __future__ import annotations

import logging

from ..errors import InfeasibleBudget
from ..io import Source
from ..validate import validate
from .attempt import Choice
from .stages import Run, build, choose, use_sequential

log = logging.getLogger(__name__)

MEASURED_CANDIDATES = (("alds", "max"), ("alds", "sum"), ("uniform", "max"))


def score(run: Run, choice: Choice, *, sequential: bool = True) -> float:
    """Build ``choice`` (with the sequential refit where it is due, unless ``sequential`` is false) and
    return its worst output relative L2 on the validation inputs (nothing is timed); the build is kept
    on the choice."""
    choice.built = build(run, choice, Source.load(run.original), sequential=sequential)
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
            err = score(run, got, sequential=False)
        tried.append({"method": method, "objective": objective, "rel_l2": err})
        if best is None or err < best[0]:
            best = (err, f"{method}/{objective}", got)
    err, picked, kept = best
    if use_sequential(run, kept.choices):
        with run.stage("sequential"):
            refit(run, kept, err)
    kept.baselines = baselines  # kept.method names the plan written (alds, or uniform where that won)
    kept.budget.update(objective="best", picked=picked, candidates=tried)
    kept.plan.budget.update(objective="best", picked=picked)
    log.info("candidate plans on the calibration data: %s; kept %s",
             ", ".join(f"{t['method']}/{t['objective']} {t['rel_l2']:.4g}" for t in tried), picked)
    return kept


def refit(run: Run, kept: Choice, one_shot_error: float) -> None:
    """Refit the picked plan sequentially and keep the refit where it does no worse on the validation
    inputs than the one-shot factors (always where the user asked for it); the budget section says
    both errors and which was kept."""
    one_shot, factors = kept.built, kept.plan.factors
    kept.built, kept.plan.factors = None, None  # the one-shot factors are not to be emitted again
    err = score(run, kept, sequential=True)
    asked = run.opts.calibration.sequential is True
    keep = asked or err <= one_shot_error
    if not keep:
        kept.built, kept.plan.factors, kept.budget["sequential"] = one_shot, factors, False
    kept.budget["sequential_refit"] = {"one_shot_rel_l2": one_shot_error, "sequential_rel_l2": err,
                                       "kept": "sequential" if keep else "one-shot"}
    log.info("sequential refit of the plan picked: relative L2 %.4g against %.4g one-shot; kept %s", err,
             one_shot_error, "the refit" if keep else "the one-shot factors")
