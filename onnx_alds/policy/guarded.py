"""A parameter or FLOP budget (or a plan applied as given), behind the speed guard.

The speed guard (:mod:`onnx_alds.measure.speed`) keeps factorizations it measures slower than their
layer out of the selection.  Where validation still measures the whole rewrite slower than its
input, the selection is redone with a stricter guard (at most ``max_speed_retries`` times); a
retry is kept only when it is not slower and not much less accurate than the first attempt.  The
default budget (none given, keep-params 0.5) is never slower than the input: where 0.5 is slower it
relaxes to :data:`~onnx_alds.options.DEFAULT_RELAXED`, and then writes the model with no layer
decomposed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..compare import WARN_OUTPUT_ERROR
from ..errors import InfeasibleBudget
from ..options import DEFAULT_FRACTION
from ..pipeline.attempt import Attempt, Choice
from ..pipeline.candidates import choose_measured
from ..pipeline.stages import Run, build, check, choose, speed_guard, unchanged

log = logging.getLogger(__name__)


@dataclass
class GuardedState:
    guard: object  # the speed model (None: no guard, e.g. --allow-slower or a plan applied as given)
    fraction: float  # the fraction solved for now
    relax: list = field(default_factory=list)  # the default budget's fractions still to try
    relaxed: bool = False  # the default budget was relaxed to ``fraction``
    requested: float = DEFAULT_FRACTION  # the fraction first solved for
    retries: int = 0  # stricter guards tried
    kept: Attempt | None = None
    first: Attempt | None = None


def _choose(run: Run, state: GuardedState) -> Choice:
    metric = run.opts.budget.metric if run.opts.budget.plan is None else "params"
    if run.opts.budget.default and state.fraction >= 1.0:
        raise InfeasibleBudget("nothing left to relax", 1.0)
    if run.objective == "best" and run.opts.budget.plan is None:
        return choose_measured(run, metric=metric, fraction=state.fraction, guard=state.guard)
    return choose(run, metric=metric, fraction=state.fraction, guard=state.guard)


def _slower(a: Attempt | None) -> bool:
    return a is None or (a.speedup or 0) < 1.0


_RETRY, _KEEP = "retry", "keep"  # what an infeasible selection leads to, besides a choice


def _on_infeasible(run: Run, state: GuardedState, e: InfeasibleBudget):
    """What an infeasible selection leads to: :data:`_RETRY` (another default fraction), the unchanged
    model's choice, :data:`_KEEP` (the previous attempt stands), or the error itself."""
    if state.relax and _slower(state.kept):
        state.fraction, state.relaxed = state.relax.pop(0), True
        why = f"needs slower factorizations ({e})" if e.smallest_fraction < 1.0 else "cannot be met"
        log.info("the default budget %s; trying keep-params %g", why, state.fraction)
        return _RETRY
    if run.opts.budget.default and state.guard is not None and _slower(state.kept):
        return unchanged(run, state.guard, f"every rewrite at the default budget tried here was slower than the "
                                           f"input on {state.guard.provider}")
    if state.kept is None:
        raise e
    log.info("a stricter selection cannot meet the budget; keeping the previous one")
    return _KEEP


def _next(run: Run, state: GuardedState, attempt: Attempt) -> bool:
    """Keep ``attempt`` where it counts; True where another selection should be tried."""
    # a retry counts only when it is not slower, and not much less accurate than the first attempt
    # (near its floor a stricter guard can meet a budget only with a few layers at tiny ranks)
    accurate = state.first is None or attempt.rel_l2 <= max(state.first.rel_l2, WARN_OUTPUT_ERROR)
    if state.kept is None or ((attempt.speedup or 0) >= 1.0 and accurate):
        state.kept = attempt
    state.first = state.first or attempt
    sp = attempt.speedup
    if state.guard is None or sp is None or run.large or (sp >= 1.0 and state.kept is attempt):
        return False
    if state.retries < run.opts.validation.max_speed_retries:
        state.retries += 1
        log.info("the rewritten model measured %.2fx; redoing the selection with a stricter speed guard", sp)
        state.guard = state.guard.stricter()
    elif state.relax:
        state.fraction, state.relaxed = state.relax.pop(0), True
        log.info("the rewritten model measured %.2fx at the default budget; trying keep-params %g",
                 sp, state.fraction)
    elif run.opts.budget.default:
        state.fraction, state.relaxed = 1.0, True  # nothing is faster here: write the model unchanged
    else:
        return False
    return True


_GUARD = object()  # run_guarded measures its own speed guard unless given one


def run_guarded(run: Run, *, fraction: float | None = None, guard=_GUARD, relax=None,
                unchanged_why: str | None = None) -> Attempt:
    """Meet a parameter or FLOP budget (or apply a plan) as the module's docstring says.  The default
    budget's policy (:mod:`.error_bounded`) passes the fraction it found, its guard and the fractions
    to relax to; ``unchanged_why`` writes the model with no layer decomposed, for that reason."""
    opts = run.opts
    if guard is _GUARD:
        guard = None
        if opts.budget.plan is None and not opts.selection.allow_slower:
            with run.stage("speed_model"):
                guard = speed_guard(opts.validation.provider)
    if fraction is None:
        fraction = opts.budget.fraction if opts.budget.plan is None else 1.0
    state = GuardedState(guard, fraction, list(relax or []), requested=fraction)
    while True:
        try:
            choice = unchanged(run, guard, unchanged_why) if unchanged_why else _choose(run, state)
        except InfeasibleBudget as e:
            choice = _on_infeasible(run, state, e)
            if choice is _KEEP:
                break
            if choice is _RETRY:
                continue
        if state.relaxed:
            choice.budget["default_relaxed"] = {"requested": state.requested, "kept": state.fraction}
        attempt = check(run, choice, build(run, choice))
        if choice.unchanged:
            state.kept = attempt
            break
        if not _next(run, state, attempt):
            break
        run.fresh_source()
    return _finish(run, state)


def _finish(run: Run, state: GuardedState) -> Attempt:
    kept = state.kept
    budget = kept.choice.budget
    if state.guard is not None:
        budget["speed_guard_retries"] = state.retries
    relaxed = budget.get("default_relaxed")
    if relaxed and not kept.choice.unchanged:
        int8 = " as int8" if run.opts.latency.int8 else ""
        budget.setdefault("warnings", []).append(
            f"the default budget keep-params {relaxed['requested']:.3g} ran slower than the input on "
            f"{state.guard.provider}{int8}; kept {relaxed['kept']:g} of the parameters instead "
            f"(--keep-params F to insist)")
    return kept
