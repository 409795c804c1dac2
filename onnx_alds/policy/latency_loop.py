"""``--keep-latency F``: a closed loop on the measured whole-model speed-up.

Each round solves the budget on the latency table (each layer's measured cost, corrected inside the
model), builds the rewrite and times it against the original side by side.  Off target it corrects
the table by what the model really ran, both ways (short of ``1/F``: compress more; more than
:data:`LATENCY_OVERSHOOT` past it: less), layer by layer where the profiler times layers in context,
else by scaling every saving (``beta``).  A round measured just outside the target
(:data:`REMEASURE_BAND`) is timed once more, and solved again only if the second measurement agrees.
The table that solved the kept plan is remembered, so that a rerun solves that plan first.  Where
the table's plans fall short, :mod:`.second_route` tries the speed guard's plans; the kept rewrite
is then judged by :func:`latency_verdict`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InfeasibleBudget
from ..measure.int8 import INT8_K_MAX
from ..measure.latency_table import BETA_RANGE, LatencyTable
from ..pipeline.attempt import Attempt, Choice
from ..pipeline.stages import Run, build, check, choose, measure
from .second_route import guarded_alternative

log = logging.getLogger(__name__)

LATENCY_TOLERANCE = 0.05  # a measured speed-up at most 5 % short of the target meets it,
LATENCY_OVERSHOOT = 0.15  # and one more than 15 % past it has compressed more than asked: solve again
REMEASURE_BAND = 0.10  # a round measured this close outside the target is measured once more
LATENCY_REFUSE = 0.85  # a rewrite measured more than 15 % short of 1/F is refused (exit 4), not written


@dataclass
class LoopState:
    table: LatencyTable  # as corrected so far
    fraction: float  # the fraction solved for (the user's, unless the table could not say how to get there)
    rounds: int = 0  # rounds re-solved
    kept: Attempt | None = None
    solved_by: LatencyTable | None = None  # the table that solved the kept round's plan
    learned_floor: float | None = None  # the corrected table's floor, where a cached correction was dropped


def latency_table(run: Run) -> LatencyTable:
    """The options' table, else one measured for this model on the provider (cached)."""
    opts = run.opts
    if opts.latency.table is not None:
        return opts.latency.table
    with run.stage("latency_table"):
        return LatencyTable.for_model(run.source.model, run.info, provider=opts.validation.provider,
                                      k_max=opts.selection.k_max or (INT8_K_MAX if opts.latency.int8 else 16),
                                      schemes=opts.selection.schemes, progress=opts.progress,
                                      int8=opts.latency.int8, int8_copies=run.int8_copies)


def _infeasible(state: LoopState, e: InfeasibleBudget, keep: float) -> bool:
    """An infeasible round: True to solve the table as measured (a cached correction is a starting
    point, not a verdict); raises where nothing was kept; False keeps the previous round."""
    table = state.table
    if state.kept is None and (table.beta != 1.0 or table.penalty):
        log.info("keep-latency %g is past the floor with the corrections learned so far (savings scaled by "
                 "%.3f, %d layers' costs); solving the table as measured", keep, table.beta, len(table.penalty))
        state.learned_floor = table.floor()
        state.table = table.with_context(table.context, {}).with_beta(1.0)
        return True
    if state.kept is None and state.learned_floor is not None:
        # infeasible as measured too: the floor to ask for is the one measured inside the model
        floor = max(state.learned_floor, e.smallest_fraction)
        timed = f" ({e.smallest_fraction:.4f} as the table timed it)" if floor > e.smallest_fraction + 5e-5 else ""
        raise InfeasibleBudget(f"the budget cannot be met: the smallest reachable fraction is {floor:.4f} with each "
                               f"layer's cost measured inside the model by earlier runs{timed}", floor) from None
    if state.kept is None:
        raise e
    log.info("a stricter selection cannot meet the budget; keeping the previous one")
    return False


def _remeasure(run: Run, state: LoopState, attempt: Attempt, target: float) -> None:
    """Just off the target, this machine's noise is of that size: measure once more; short, the
    faster of the two counts (load only ever adds time), past the overshoot line the slower."""
    lo, hi = target * (1 - LATENCY_TOLERANCE), target * (1 + LATENCY_OVERSHOOT)
    got = attempt.latency.speedup
    short, past = lo * (1 - REMEASURE_BAND) <= got < lo, hi < got <= hi * (1 + REMEASURE_BAND)
    if not (short or past) or run.large:
        return
    again = measure(run, attempt.model, state.table, attempt.choice.choices)
    attempt.choice.budget["remeasured"] = "faster" if short else "slower"  # the one kept, of two measurements
    if (again.speedup > got) == short:
        attempt.latency = again
        attempt.choice.budget.update(again.to_budget())


def _rank(attempt: Attempt, target: float):
    """Meeting the target first, then the closest to it."""
    g = attempt.latency.speedup
    return g < target * (1 - LATENCY_TOLERANCE), abs(np.log(g / target))


def _correct(run: Run, state: LoopState, attempt: Attempt, target: float) -> None:
    """Layers timed alone do not add up to the model: correct the table by what this selection saved
    inside the whole model against what the table predicted; where it saved nothing, no scaling of
    the savings can say how much more to compress: ask the table for the missing ratio instead."""
    table, choices, got = state.table, attempt.choice.choices, attempt.latency.speedup
    if table.context:  # layer by layer first: the profiler times each factorized layer inside the model
        with run.stage("profile"):
            table = table.learned(choices, *run.measurer.profile(run.original, attempt.model, table, run.info,
                                                                  choices))
    learned = table.corrected(table.predicted_ms(choices), attempt.latency.before_ms, attempt.latency.after_ms)
    predicted = _predicted(state.table, attempt.choice)
    if got > 1.0 and learned.beta > BETA_RANGE[0]:
        log.info("measured %.2fx for a target of %.2fx (predicted %.2fx); solving again with the table's savings "
                 "scaled by %.3f", got, target, predicted, learned.beta)
        table = learned
    elif table.context:
        log.info("measured %.2fx for a target of %.2fx (predicted %.2fx); solving again with the layers' costs "
                 "measured inside the model", got, target, predicted)
    else:
        state.fraction = min(1.0, state.fraction * got / target)
        log.info("measured %.2fx for a target of %.2fx; solving again for keep-latency %.3f", got, target,
                 state.fraction)
    state.table = table


def _round(run: Run, state: LoopState, choice: Choice, keep: float) -> Attempt:
    choice.budget["beta"] = state.table.beta
    if state.fraction != keep:  # the user's budget stays what the report says
        choice.budget.update(solved_fraction=state.fraction, fraction=keep, target=keep * choice.budget["total_before"])
    attempt = check(run, choice, build(run, choice), state.table)
    choice.budget["rounds"] = state.rounds + 1
    return attempt


def run_latency(run: Run) -> Attempt:
    """Meet ``--keep-latency F`` (see the module's docstring); raises :class:`InfeasibleBudget` where
    the kept rewrite is refused."""
    keep = run.opts.budget.keep_latency
    target = 1.0 / keep
    state = LoopState(latency_table(run), keep)
    while True:
        try:
            choice = choose(run, metric="latency", fraction=state.fraction, table=state.table)
        except InfeasibleBudget as e:
            if _infeasible(state, e, keep):
                continue
            break
        attempt = _round(run, state, choice, keep)
        _remeasure(run, state, attempt, target)
        if state.kept is None or _rank(attempt, target) < _rank(state.kept, target):
            state.kept, state.solved_by = attempt, state.table  # remembered: a rerun solves this plan first
        got = attempt.latency.speedup
        if target * (1 - LATENCY_TOLERANCE) <= got <= target * (1 + LATENCY_OVERSHOOT) \
                or state.rounds + 1 >= run.opts.latency.max_rounds or run.large:
            break
        _correct(run, state, attempt, target)
        state.rounds += 1
        run.fresh_source()
    return _conclude(run, state, keep)


def _conclude(run: Run, state: LoopState, keep: float) -> Attempt:
    kept, route = state.kept, False
    if not kept.choice.decomposed:  # the same graph (e.g. --keep-latency 1): as fast as itself, not the noise
        kept.choice.unchanged = True
    if not run.large and not run.opts.latency.int8 and _speedup(kept) < (1 - LATENCY_TOLERANCE) / keep:
        # the table's plans fell short (on small models a layer's time is a few µs, and timed alone it
        # says little of the layer inside the model): try the speed guard's plans, measured
        better = guarded_alternative(run, state.table, beat=_speedup(kept))
        if better is not None:
            state.kept, route = better, True
    state.kept.choice.budget["rounds_tried"] = state.rounds + 1
    # the next run on this model starts from the table its kept plan was solved with, so that a rerun of
    # the same command solves the same plan first; the route's plans were not solved by the table
    (state.solved_by if state.solved_by is not None and not route else state.table).remember()
    kept = state.kept
    predicted = _predicted(state.table, kept.choice)
    warnings = kept.choice.budget.setdefault("warnings", [])
    if kept.choice.unchanged:  # said here: validation's gate leaves an unchanged choice's warning to its maker
        warnings.append(f"--keep-latency {keep:g}: no layer was decomposed, so the model is written unchanged")
    warnings.extend(latency_verdict(
        keep, _speedup(kept), predicted, state.rounds + 1, state.table, best_effort=run.opts.latency.best_effort))
    return kept


def _speedup(attempt: Attempt) -> float:
    """The kept rewrite's measured speed-up; 1 for a rewrite that decomposed nothing (the same graph)."""
    return 1.0 if attempt.choice.unchanged else attempt.latency.speedup


def _predicted(table: LatencyTable, choice: Choice) -> float:
    """The speed-up the table predicted for a choice (NaN where it could not)."""
    return table.model_ms / choice.predicted_ms if choice.predicted_ms else float("nan")


def latency_verdict(keep_latency: float, got: float, predicted: float, rounds: int, table,
                    best_effort: bool = False) -> list[str]:
    """What ``--keep-latency F`` does with its kept rewrite, measured at ``got`` against the target
    ``1/F``: a slower one, or one more than 15 % short (:data:`LATENCY_REFUSE`, unless ``best_effort``),
    is refused (:class:`InfeasibleBudget`: nothing is written, and the message gives the fraction that
    the table corrected inside the model can reach); one more than 5 % short is kept with a warning
    (returned)."""
    target = 1.0 / keep_latency
    where = f"in {rounds} rounds on {table.provider if table is not None else 'the provider'}"
    if got < 1.0:  # a latency budget is never met by a slower model
        raise InfeasibleBudget(
            f"--keep-latency {keep_latency:g}: no rewrite tried ran faster than the input (the fastest measured "
            f"{got:.2f}x {where}, the table predicted {predicted:.2f}x); nothing was written", 1.0)
    if got < target * LATENCY_REFUSE and not best_effort:
        floor = table.floor() if table is not None else 1.0 / got
        raise InfeasibleBudget(
            f"--keep-latency {keep_latency:g} asks for {target:.2f}x; the fastest rewrite measured {got:.2f}x {where}"
            f", and with each layer timed inside the model the smallest reachable fraction is {floor:.3f} "
            f"(measured: {1.0 / got:.3f}); nothing was written (--best-effort writes it)", max(floor, 1.0 / got))
    if got < target * (1 - LATENCY_TOLERANCE):
        return [f"--keep-latency {keep_latency:g} asks for {target:.2f}x; the closest measured rewrite runs "
                f"{got:.2f}x (the table predicted {predicted:.2f}x)"]
    return []
