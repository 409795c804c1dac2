"""``objective="best"``: candidate plans built and judged on the calibration data.

The exact solvers optimise a proxy (each layer's error: its max, or its sum); this measures what
the user sees.  The min-max plan, the min-sum plan and the uniform plan at the same budget (same
error model, same speed guard; and where convs fold other ways than s0 under the data-aware model,
the min-max and min-sum plans of s0 alone, :data:`S0_ONLY`) are each emitted and run on the
validation inputs (held-out calibration samples: a plan is not judged on the data it was fitted on),
and the best is kept, with
its build (it is not built again); the report's method names the plan written.  Best means, in this
order (:func:`~onnx_alds.validate.best_judged`): the task metric where ``--metric-script`` gives
one; where outputs are class scores, a top-1 agreement within noise of the best (a patch
transformer's uniform plan at keep 0.15 had the lowest logit error, 0.99 against 1.07, and kept 11 %
of the held-out answers where the min-sum plan kept 24 %); the lowest worst-output relative L2.

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
from ..report import judged_figures
from ..validate import Validation, best_judged, validate
from .attempt import Built, Choice, build_key
from .stages import Run, build, choose, use_sequential

log = logging.getLogger(__name__)

MEASURED_CANDIDATES = (("alds", "max"), ("alds", "sum"), ("uniform", "max"))
# and, where the data-aware model offers convs more foldings than s0, the min-max and min-sum plans of s0
# alone: whitened factors fit the calibration data and the other schemes' weight-SVD factors do not, and
# which generalises better is measured, not assumed (a text detector's min-sum plan: 0.065 held out for
# s0 alone, 0.069 with an s2 layer, and one point of its boxes; a video CNN: the (2+1)-D split is 8
# points better)
S0_ONLY = (("alds", "max", ("s0",)), ("alds", "sum", ("s0",)))


def _candidates(run: Run) -> list[tuple]:
    """(method, objective, schemes) of every candidate: schemes None is the options'."""
    out = [(m, o, None) for m, o in MEASURED_CANDIDATES]
    if run.opts.selection.schemes is None and run.emodel.name == "data" and any(
            s != "s0" and run.emodel.offers(l, 1, s) for l in run.info.candidates for s in l.schemes):
        out += S0_ONLY
    return out


def label(method: str, objective: str, schemes=None) -> str:
    """A candidate's name in the report: ``alds/max``, ``uniform/max``, ``alds/max/s0``."""
    return "/".join([method, objective, *(["+".join(schemes)] if schemes else [])])


def judge(run: Run, built: Built, **kw):
    """A build's outputs against the original's on the validation inputs (nothing is timed)."""
    return validate(run.original, built.model, provider=run.opts.validation.provider,
                    input_shapes=run.info.input_shapes, feeds=run.cal_data, repeats=0,
                    output_kinds=run.opts.validation.output_kinds, **kw)


def _judged(run: Run, built: Built) -> Validation:
    """A build's outputs against the original's on the validation inputs (kept on the build), with its
    task metric where there is one (``built.score``)."""
    built.judged = judge(run, built)
    run.score(built)
    return built.judged


def _best(builds: list[Built]) -> int:
    """The index of the best of judged builds (:func:`~onnx_alds.validate.best_judged`)."""
    return best_judged([(b.judged, b.score) for b in builds])


def score(run: Run, choice: Choice, *, sequential: bool = True) -> Validation:
    """Build ``choice`` (with the sequential refit where it is due, unless ``sequential`` is false) and
    judge it (:func:`_judged`); the build is kept on the choice."""
    choice.built = build(run, choice, Source.load(run.original), sequential=sequential)
    return _judged(run, choice.built)


def _figures(built: Built) -> dict:
    """A judged build's figures as the report lists them."""
    v = built.judged
    return {"rel_l2": v.rel_l2, **({} if v.top1_agreement is None else {"top1_agreement": v.top1_agreement}),
            **({} if built.score is None else {"metric": built.score})}


def refitted(run: Run, choice: Choice) -> Built:
    """``choice`` built with the sequential refit, whatever factors a one-shot build left on its plan
    (they would be emitted again otherwise); the plan carries the refit's factors after."""
    choice.built, choice.plan.factors = None, None
    return build(run, choice, Source.load(run.original), sequential=True)


def _searched(run: Run, choice: Choice) -> Built | None:
    """The default search's refitted build of the same plan, judged already, if any."""
    r = run.reuse
    if r is None or r.judged is None or r.key is None or not r.key[-1]:
        return None
    return r if r.key == build_key(choice.choices, True) else None


def _keep(choice: Choice, built: Built, sequential: bool) -> None:
    choice.built, choice.plan.factors, choice.budget["sequential"] = built, built.factors, sequential


def choose_measured(run: Run, *, metric: str, fraction: float, guard=None) -> Choice:
    """The best candidate on the calibration data (see the module docstring); the baselines are the
    min-max solve's, and the budget section names every candidate's figures.  Candidates are built
    one-shot; a refitted build of one the default search judged already competes too, and the plan
    picked is refitted (:func:`refit`) where it was not."""
    tried, options, baselines = [], [], None  # options: (label, choice, build, refitted)
    for i, (method, objective, schemes) in enumerate(_candidates(run)):
        try:
            got = choose(run, metric=metric, fraction=fraction, guard=guard, method=method, objective=objective,
                         compare=run.opts.selection.compare and i == 0, schemes=schemes)
        except InfeasibleBudget:
            if i == 0:
                raise  # the min-max plan is the most permissive: nothing else can meet the budget
            continue
        baselines = got.baselines if baselines is None else baselines
        name = label(method, objective, schemes)
        with run.stage("candidates"):
            score(run, got, sequential=False)
        tried.append({"method": method, "objective": objective, **({"schemes": list(schemes)} if schemes else {}),
                      **_figures(got.built)})
        options.append((name, got, got.built, False))
        searched = _searched(run, got)
        if searched is not None:
            options.append((name, got, searched, True))
    picked, kept, built, refitted_ = options[_best([o[2] for o in options])]
    options = got = searched = None  # the other candidates' models go before the refit's sweep (memory)
    _keep(kept, built, refitted_)
    if refitted_:
        kept.budget["sequential_refit"] = {**{f"sequential_{k}": v for k, v in _figures(built).items()},
                                           "kept": "sequential", "from": "the default search"}
    elif use_sequential(run, kept.choices):
        with run.stage("sequential"):
            refit(run, kept, built)
    kept.baselines = baselines  # kept.method names the plan written (alds, or uniform where that won)
    kept.budget.update(objective="best", picked=picked, candidates=tried)
    kept.plan.budget.update(objective="best", picked=picked)
    log.info("candidate plans on the calibration data: %s; kept %s",
             ", ".join(f"{t['method']}/{t['objective']} {judged_figures(t)}" for t in tried), picked)
    return kept


def refit(run: Run, kept: Choice, one_shot: Built) -> None:
    """Refit the picked plan sequentially and keep the refit where it does no worse on the validation
    inputs than the one-shot factors (always where the user asked for it); the budget section says
    both errors and which was kept."""
    seq = refitted(run, kept)
    _judged(run, seq)
    keep = run.opts.calibration.sequential is True or _best([seq, one_shot]) == 0
    _keep(kept, seq if keep else one_shot, keep)
    kept.budget["sequential_refit"] = {**{f"one_shot_{k}": v for k, v in _figures(one_shot).items()},
                                       **{f"sequential_{k}": v for k, v in _figures(seq).items()},
                                       "kept": "sequential" if keep else "one-shot"}
    log.info("sequential refit of the plan picked: relative L2 %s against %s one-shot; kept %s",
             judged_figures(_figures(seq)), judged_figures(_figures(one_shot)),
             "the refit" if keep else "the one-shot factors")
