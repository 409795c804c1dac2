"""The default budget (none given): the smallest plan whose outputs stay within a tolerance.

A fixed fraction breaks real models: keep-params 0.5, right for the shipped ResNet20, turned a
pretrained text recogniser's output to nothing and a sentence encoder's cosine to 0.4 (see
``docs/real-models.md``).  So with no budget the kept fraction is searched, by bisection over
keep-params in [:data:`LOWEST`, 1], for the smallest one whose rewrite keeps every output within the
tolerance on the validation inputs: worst relative L2 at most ``--max-output-error`` (default
:data:`TOLERANCE` on held-out calibration samples) and, for class scores, top-1 agreement at least
:data:`TOP1_AGREEMENT`.  The default tolerance is tighter for an output that hardly moves on its own:
at most :data:`NOISE_FACTOR` × how far it moves when the float inputs move by :data:`NOISE` of their
standard deviation (:func:`onnx_alds.validate.noise_response`).  One relative L2 does not mean one
thing for every model: a recogniser's logits move 0.12 under that noise and its characters held at
0.19, a saliency map moves 0.0065 and lost 4.8 points of its regions of interest at 0.02
(docs/real-models.md).  Without calibration data the model is written unchanged, with a warning
that names ``--calibration``: random inputs say too little of a real model (unless the user names
``--max-output-error``, which is then judged on seeded random inputs).  The speed guard then keeps it no slower than its input
(:mod:`.guarded`, which only ever relaxes to more parameters, so less error).  Where even the
least compression tried exceeds the tolerance, the model is written with no layer decomposed, and
the report says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import InfeasibleBudget
from ..io import Source
from ..metric import TaskMetric
from ..options import DEFAULT_FRACTION, DEFAULT_RELAXED
from ..pipeline.candidates import judge, refitted
from ..pipeline.stages import Run, build, choose, no_layer_reason, speed_guard, use_sequential
from ..validate import best_judged, noise_response
from .guarded import run_guarded

log = logging.getLogger(__name__)

TOLERANCE = 0.1  # worst output relative L2 on held-out calibration samples (compare.WARN_OUTPUT_ERROR)
NOISE = 0.01  # the input noise that scales the default tolerance: 1 % of each float input's standard deviation
NOISE_FACTOR = 2.0  # ... an output may move at most this many times what that noise moves it
TOP1_AGREEMENT = 0.99  # class scores: at most 1 point of top-1 disagreement with the original
LOWEST = 0.15  # the least kept fraction the search tries
PROBES = 5  # bisection steps
RANDOM_BATCH = 8  # random inputs drawn to judge a probe without calibration data


@dataclass
class BoundState:
    tolerance: float | None  # worst output relative L2 (None: not bounded, the task metric judges alone)
    judged_on: str  # "held-out calibration", "calibration" or "random inputs"
    tried: list = field(default_factory=list)  # (fraction, worst rel L2, worst top-1 agreement or None[, score])
    stopped: str | None = None  # why the search ended before its last probe
    metric: TaskMetric | None = None  # --metric-script: a probe passes where its score drops at most as allowed
    per_output: dict = field(default_factory=dict)  # output name -> its own, tighter tolerance
    excess: list = field(default_factory=list)  # each probe's worst output error / its tolerance

    def over(self, v) -> float:
        """The worst output relative L2 of validation ``v`` as a multiple of its output's tolerance."""
        def ratio(err: float, tol: float) -> float:
            return err / tol if tol else (0.0 if err == 0 else float("inf"))

        return max(ratio(o["rel_l2"], self.per_output.get(name, self.tolerance)) for name, o in v.outputs.items())

    def ok(self, v, score: float | None = None) -> bool:
        if self.metric is not None:
            return self.metric.ok(score) and (self.tolerance is None or self.over(v) <= 1.0)
        return self.over(v) <= 1.0 and (v.top1_agreement is None or v.top1_agreement >= TOP1_AGREEMENT)

    def better(self, v, score, than_v, than_score) -> bool:
        """Whether validation ``v`` with task metric ``score`` is at least as good as the other pair."""
        return best_judged([(v, score), (than_v, than_score)]) == 0


def _judge(run: Run, built):
    return judge(run, built, batch=RANDOM_BATCH)


def _probe(run: Run, state: BoundState, guard, fraction: float) -> bool:
    """Build the selection at keep-params ``fraction`` and judge its outputs (nothing timed)."""
    try:
        choice = choose(run, metric="params", fraction=fraction, guard=guard, compare=False,
                        objective="max" if run.objective == "best" else None)
    except InfeasibleBudget:
        return False
    if not choice.decomposed:
        return True
    # a probe is judged as the final build will be made: one-shot, and where that misses and a
    # sequential refit is due, refitted (the better of the two is what candidates.refit keeps)
    asked = run.opts.calibration.sequential is True
    built = build(run, choice, Source.load(run.original), sequential=asked)
    v, score = _judge(run, built), run.score(built)
    if not state.ok(v, score) and not asked and use_sequential(run, choice.choices):
        refit = refitted(run, choice)
        w, refit_score = _judge(run, refit), run.score(refit)
        log.info("default budget: keep-params %.3f refitted sequentially: relative L2 %.3g against %.3g one-shot",
                 fraction, w.rel_l2, v.rel_l2)
        if state.better(w, refit_score, v, score):
            built, v, score = refit, w, refit_score
    state.tried.append((fraction, v.rel_l2, v.top1_agreement) + (() if state.metric is None else (score,)))
    if state.tolerance is not None:
        state.excess.append((fraction, state.over(v)))
    good = state.ok(v, score)
    if good:  # the smallest fraction within the tolerance so far: its build is not made again
        built.judged, run.reuse = v, built
    log.info("default budget: keep-params %.3f gives relative L2 %.3g%s%s on %s: %s", fraction, v.rel_l2,
             "" if v.top1_agreement is None else f", top-1 agreement {100 * v.top1_agreement:.1f} %",
             "" if score is None else f", metric {score:.4g} (original {state.metric.original:.4g})",
             state.judged_on, "within" if good else "past")
    return good


def out_of_reach(tried: list, tolerance: float) -> bool:
    """Whether the search can stop with nothing found: the line through the two largest fractions tried
    (both past the tolerance) reaches the tolerance only at a fraction of 1 or more.  A model's output
    error falls ever more slowly as the kept fraction grows (the curve is convex), so that line
    promises less error above the fractions than the model gives: where even it misses the tolerance
    below 1, the remaining probes would too (on the real models of docs/real-models.md the search
    saved two of its five builds this way, each as long as a rewrite)."""
    if len(tried) < 2:
        return False
    (f0, e0), (f1, e1) = sorted(t[:2] for t in tried[-2:])
    if e1 <= tolerance or f1 <= f0:
        return False
    if e1 >= e0:  # no better for more parameters: nothing to extrapolate towards
        return True
    return f1 + (e1 - tolerance) * (f1 - f0) / (e0 - e1) >= 1.0


def bounded_fraction(run: Run, state: BoundState, guard) -> float | None:
    """The smallest keep-params fraction found within the tolerance (None: none below 1): 0.5 first,
    then bisection below it where it holds, above it where it does not, stopping when the tolerance
    is out of reach (:func:`out_of_reach`)."""
    with run.stage("default_search"):
        if _probe(run, state, guard, DEFAULT_FRACTION):
            lo, hi, best = LOWEST, DEFAULT_FRACTION, DEFAULT_FRACTION
        else:
            lo, hi, best = DEFAULT_FRACTION, 1.0, None
        for _ in range(PROBES - 1):
            # (a task metric need not fall smoothly with the fraction: no extrapolation from it)
            if best is None and state.metric is None and out_of_reach(state.excess, 1.0):
                state.stopped = "the tolerance is out of reach below keep-params 1 (extrapolated from the last two)"
                log.info("default budget: %s", state.stopped)
                break
            mid = (lo + hi) / 2
            if _probe(run, state, guard, mid):
                best, hi = mid, mid
            else:
                lo = mid
        return best


NO_DATA = ("no budget and no calibration data, so the model is written unchanged; give --calibration CAL.npz "
           "for the smallest plan within the output tolerance on your data, or --max-output-error X to judge on "
           "random inputs")


def run_error_bounded(run: Run):
    """Meet the default budget as the module's docstring says; returns the kept attempt."""
    opts = run.opts
    data = run.cal_data is not None
    tolerance = opts.validation.max_output_error
    if run.metric is not None:  # the user's metric judges; relative L2 only where bounded as well
        return _bounded(run, BoundState(tolerance, run.cal_split if data else "random inputs", metric=run.metric))
    if not run.info.candidates:  # nothing to search: written as it is, and said why
        attempt = run_guarded(run, fraction=1.0, guard=None, relax=[], unchanged_why=no_layer_reason(run.info))
        attempt.choice.budget["default"] = {"tolerance": None, "judged_on": "no compressible layer",
                                            "tried": [], "kept": 1.0}
        return attempt
    if tolerance is None and not data:
        # random inputs say too little of a real model to compress it on their word (docs/real-models.md:
        # a detector's error on them was 5-23 while its recall held; a recogniser's 0.25 when it read nothing)
        attempt = run_guarded(run, fraction=1.0, guard=None, relax=[], unchanged_why=NO_DATA)
        attempt.choice.budget["default"] = {"tolerance": None, "judged_on": "no calibration data", "tried": [],
                                            "kept": 1.0}
        return attempt
    state = BoundState(TOLERANCE if tolerance is None else tolerance, run.cal_split if data else "random inputs")
    if tolerance is None:  # the default tolerance, tightened for outputs that hardly move on their own
        state.per_output = output_tolerances(run, TOLERANCE)
    attempt = _bounded(run, state)
    if not data:  # --max-output-error given: judged on random inputs, as asked
        attempt.choice.budget.setdefault("warnings", []).append(
            f"the default budget judged the outputs on random inputs (relative L2 at most {tolerance:g}); "
            f"give --calibration CAL.npz to judge them on your data")
    return attempt


def output_tolerances(run: Run, base: float) -> dict[str, float]:
    """Per output, :data:`NOISE_FACTOR` × how far the original's output moves under :data:`NOISE` input
    noise on the validation inputs, where that is below ``base`` (an output that noise does not move at
    all gives no scale and keeps ``base``)."""
    with run.stage("noise_reference"):
        moved = noise_response(run.original, run.cal_data, provider=run.opts.validation.provider, noise=NOISE,
                               output_kinds=run.opts.validation.output_kinds)
    tight = {name: NOISE_FACTOR * r for name, r in moved.items() if 0 < NOISE_FACTOR * r < base}
    for name, tol in tight.items():
        log.info("default budget: output %r moves %.3g under %g %% input noise: its tolerance is %.3g",
                 name, moved[name], 100 * NOISE, tol)
    return tight


def _bounded(run: Run, state: BoundState):
    """The search and the kept attempt, with the report's ``default`` section."""
    opts, tolerance = run.opts, state.tolerance
    guard = None if opts.selection.allow_slower else speed_guard(opts.validation.provider)
    fraction = bounded_fraction(run, state, guard)
    report_section = {"tolerance": tolerance, "judged_on": state.judged_on, "top1_agreement": TOP1_AGREEMENT,
                      "tried": [list(t) for t in state.tried], "kept": fraction or 1.0}
    if state.per_output:  # the tightest tolerance is the one the summary and the plot show
        report_section.update(tolerance=min(state.per_output.values()), base_tolerance=tolerance,
                              output_tolerances=dict(state.per_output),
                              noise_reference={"input_noise": NOISE, "factor": NOISE_FACTOR})
    if state.metric is not None:
        report_section.update(metric=state.metric.name, metric_original=state.metric.original,
                              max_metric_drop=state.metric.allowed_drop)
    if state.stopped:
        report_section["stopped"] = state.stopped
    if fraction is None:
        why = (f"every compression tried changed the outputs past relative L2 "
               f"{report_section['tolerance']:.3g} on {state.judged_on} "
               f"(--max-output-error X sets the tolerance)") if state.metric is None else \
            (f"every compression tried dropped the metric of --metric-script {state.metric.name!r} by more than "
             f"{state.metric.allowed_drop:.3g} (--max-metric-drop D sets the drop allowed)")
        attempt = run_guarded(run, fraction=1.0, guard=guard, relax=[], unchanged_why=why)
    else:
        attempt = run_guarded(run, fraction=fraction, guard=guard,
                              relax=[r for r in DEFAULT_RELAXED if r > fraction])
    attempt.choice.budget["default"] = report_section
    return attempt
