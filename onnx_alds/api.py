"""The public API: wires the stages, and does no stage work of its own.

    load → extract → calibrate → error model → cost model → select (Plan)
         → factorize → emit → check → validate (gate) → report
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from .cost import cost_model, full_rank
from .emit import emit
from .error_model import error_model
from .errors import InfeasibleBudget, UsageError, ValidationFailed
from .extract import ModelInfo, count_params, extract, model_flops
from .io import (EXTERNAL_DATA_THRESHOLD, Source, check_model_file, check_rewritten, proto_size, save_model, temp_dir,
                 trim_memory)
from .plan import LayerPlan, Plan, resolve
from .report import Report, build_report
from .select import Config, Selection, layer_configs, layer_options, solve
from .compare import WARN_OUTPUT_ERROR
from .measure.latency_table import BETA_RANGE

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - t0, 4)


def analyze(model_or_path, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, Source, ModelInfo]:
    source = Source.load(model_or_path)
    return source.model, source, extract(source.model, source.graph, input_shapes)


def inspect(model_or_path, input_shapes: dict | None = None) -> ModelInfo:
    return analyze(model_or_path, input_shapes)[2]


def budget_of(keep_params, keep_flops, keep_latency) -> tuple[str, float]:
    given = [(m, v) for m, v in (("params", keep_params), ("flops", keep_flops), ("latency", keep_latency))
             if v is not None]
    if len(given) > 1:
        raise UsageError("give only one of keep_params, keep_flops and keep_latency")
    metric, frac = given[0] if given else ("params", 0.5)
    try:
        frac = float(frac)
    except (TypeError, ValueError):
        raise UsageError(f"the kept fraction {frac!r} is not a number") from None
    if not (0.0 < frac <= 1.0) or np.isnan(frac):
        raise UsageError(f"the kept fraction must be in (0, 1], got {frac}")
    return metric, frac


def calibrate(source: Source, info: ModelInfo, calibration, *, provider: str = "auto", progress: bool = False,
              moments: bool = True, max_validation_samples: int = 256):
    """Load and check the calibration data; returns the validation feeds (at
    most ``max_validation_samples``, name → array) and, with ``moments``, the
    second moments of every candidate layer's input patches."""
    from .calibration import collect_moments, first_samples, load_calibration, model_inputs, taps_for

    data = load_calibration(calibration, model_inputs(source.model))
    feeds = first_samples(data, max_validation_samples)
    if not moments:
        return feeds, None, data
    model = source.path if source.large and source.path is not None else source.model
    return feeds, collect_moments(model, taps_for(info.candidates), data, provider=provider,
                                  progress=progress), data


def options_for(info: ModelInfo, source: Source, emodel, cmodel, configs, *, progress=False, admissible=None):
    """Error curves (error model) and costs (cost model) → each layer's options."""
    cands = info.candidates
    configs = {l.name: [(k, s) for k, s in configs[l.name] if s in emodel.schemes(l, l.schemes)] for l in cands}
    curves = emodel.curves(source, cands, configs, progress=progress)

    def costs(layer):
        extra = emodel.extra_params(layer) if cmodel.name == "params" else 0
        if not extra:
            return partial(cmodel.configs, layer)
        return lambda k, s, ranks: cmodel.configs(layer, k, s, ranks) + extra  # a bias the factors add

    return [layer_options(l.name, curves[l.name], cmodel.dense(l), costs(l), full_rank(l.geometry, 1, "s0"),
                          partial(admissible, l) if admissible is not None else None) for l in cands]


def speed_guard(provider: str = "auto", threads: int = 2):
    """The measured (cached) speed model that keeps slower factorizations out
    (:mod:`onnx_alds.speed`); None, with a warning, without onnxruntime."""
    import importlib.util

    from .measure.speed import SpeedModel

    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("no speed guard: onnxruntime is not installed")
        return None
    return SpeedModel.for_provider(provider, threads)


def select(info: ModelInfo, source: Source, emodel, *, metric: str, fraction: float, method: str = "alds",
           schemes=None, k_max=None, latency_table=None, compare: bool = True, progress: bool = False,
           timings: dict | None = None, admissible=None, fill: bool = True,
           objective: str = "max") -> tuple[Selection, dict]:
    """Run the selector; returns the selection and the objective value (max
    error, or root-sum-square error for ``objective="sum"``) the other methods
    reach at the same budget with the same error model."""
    timings = {} if timings is None else timings
    cands = info.candidates
    if metric == "flops" and (any(l.geometry.flops is None for l in cands) or info.flops_total is None):
        raise UsageError("FLOPs are unknown for this model's dynamic sizes; give them with "
                         "--input-shape NAME:D1,D2,...")
    if metric == "latency":
        if latency_table is None:
            raise UsageError("a latency budget needs a latency table")
        configs = {l.name: latency_table.configs(l.name) for l in cands}  # only what the table measured
    else:
        configs = layer_configs(cands, ("s0",) if method == "alds-paper" and schemes is None else schemes, k_max)
    cmodel = cost_model(metric, latency_table)
    with _timed(timings, "errors"):
        options = options_for(info, source, emodel, cmodel, configs, progress=progress, admissible=admissible)
    with _timed(timings, "select"):
        sel, baselines = solve(options, method=method, fraction=fraction, total=cmodel.total(info),
                               compare=compare, fill=fill, objective=objective)
    sel.details["metric"] = metric
    if metric == "latency":
        sel.details["predicted_ms"] = latency_table.predicted_ms(sel.choices)
    return sel, baselines


def plan_from_selection(sel: Selection, info: ModelInfo, error: str) -> Plan:
    layers = [LayerPlan(l.name, l.weight_name, c.k, c.scheme, c.rank)
              for l in info.candidates if (c := sel.choices.get(l.name)) is not None]
    budget = {k: sel.details[k] for k in ("metric", "fraction") if k in sel.details}
    budget.update(method=sel.method, error_model=error, max_rel_error=sel.max_rel_error)
    if sel.details.get("objective"):
        budget.update(objective=sel.details["objective"], rss_error=sel.rss_error)
    return Plan(layers=layers, budget=budget)


def choices_from_plan(plan: Plan, info: ModelInfo, source: Source, emodel) -> dict[str, Config]:
    """A plan's configurations, with the error the error model predicts for each."""
    resolved = resolve(plan, info)
    layers = [info.layer(n) for n in resolved]
    curves = emodel.curves(source, layers, {n: [resolved[n][:2]] for n in resolved}) if layers else {}
    return {n: Config(k, s, r, float(curves[n][(k, s)][r])) for n, (k, s, r, _) in resolved.items()}


def _choose(info, source, emodel, plan, *, keep_params, keep_flops, keep_latency, method, schemes, k_max,
            provider, compare, latency_table, progress, timings, guard, fill=True, objective="max"):
    """Selection (or a given plan) → choices, plan, budget section, baselines."""
    if plan is not None:
        with _timed(timings, "errors"):
            choices = choices_from_plan(plan, info, source, emodel)
        return choices, plan, dict(plan.budget, applied_plan=True), {}, plan.budget.get("method", "plan")
    metric, fraction = budget_of(keep_params, keep_flops, keep_latency)
    try:
        sel, baselines = select(info, source, emodel, metric=metric, fraction=fraction, method=method,
                                schemes=schemes, k_max=k_max, latency_table=latency_table, compare=compare,
                                progress=progress, timings=timings, fill=fill, objective=objective,
                                admissible=guard.admissible if guard is not None else None)
    except InfeasibleBudget as e:
        if guard is None:
            raise
        raise InfeasibleBudget(f"{e} without factorizations that would run slower than their layer on "
                               f"{guard.provider} (--allow-slower lifts this)", e.smallest_fraction) from None
    budget = {"metric": metric, "fraction": fraction, "target": sel.details["target"],
              "predicted": sel.details["predicted"], "total_before": sel.details["total"],
              "speed_guard": guard.summary() if guard is not None else None,
              "objective": objective, "rss_error": sel.rss_error}
    if metric == "latency":
        budget.update(latency_table.summary(sel.details["predicted_ms"]))
    return sel.choices, plan_from_selection(sel, info, emodel.name), budget, baselines, method


LATENCY_TOLERANCE = 0.05  # --keep-latency: a measured speed-up at most 5 % short of the target meets it,
LATENCY_OVERSHOOT = 0.15  # and one more than 15 % past it has compressed more than asked: solve again
REMEASURE_BAND = 0.10  # --keep-latency: a round measured this close outside the target is measured once more
LATENCY_REFUSE = 0.85  # a rewrite measured more than 15 % short of 1/F is refused (exit 4), not written
SEQUENTIAL_MACS = 5e11  # sequential calibration by default while its forward passes stay this cheap
DEFAULT_FRACTION = 0.5  # the default budget: keep-params 0.5, ...
DEFAULT_RELAXED = (0.75, 0.9)  # ... then these where 0.5 is slower, then no layer decomposed


def _objective_for(objective, method, emodel, cal_data, keep_latency, large) -> str:
    """``None`` → ``"best"`` (measured candidates) where the calibration data can judge them: alds with
    data-aware errors under a parameter or FLOP budget, on a model under 2 GB; ``"max"`` otherwise."""
    if objective not in (None, "best"):
        return objective
    measurable = method == "alds" and emodel.name == "data" and cal_data and keep_latency is None and not large
    if objective == "best" and not measurable:
        raise UsageError("objective 'best' measures candidate plans on the calibration data: it needs "
                         "--calibration with the data error model, --method alds and a parameter or FLOP budget")
    return "best" if measurable else "max"


def _err(report) -> float:
    return float((report.validation or {}).get("rel_l2") or 0.0)


def _why(e: InfeasibleBudget) -> str:
    return f"needs slower factorizations ({e})" if e.smallest_fraction < 1.0 else "cannot be met"


def _unchanged(info, guard, int8: bool = False):
    """The default budget's last resort: no factorization measured or predicted faster than its layer
    on this provider, so the model is written with no layer decomposed (and says so)."""
    log.info("no factorization at the default budget runs faster than its layer on %s: the model is written "
             "with no layer decomposed (give --keep-params to compress anyway, or --allow-slower)", guard.provider)
    budget = {"metric": "params", "fraction": 1.0, "unchanged": True, "speed_guard": guard.summary(),
              "warnings": [f"no layer was decomposed: every rewrite at the default budget tried here was slower "
                           f"than the input on {guard.provider}{' as int8' if int8 else ''}; --keep-params F "
                           f"compresses anyway"]}
    plan = Plan(layers=[], budget={"metric": "params", "fraction": 1.0, "method": "none"})
    return {l.name: None for l in info.candidates}, plan, budget, {}, "alds"


MEASURED_CANDIDATES = (("alds", "max"), ("alds", "sum"), ("uniform", "max"))


def _build_and_score(original, info, emodel, choices, plan, provider, cal_data, cal_all, sequential):
    """A candidate selection built as the rewrite builds it (with the sequential refit where it is on)
    and its worst output relative L2 on the calibration inputs (nothing is timed); returns
    ``(error, (new model, measured layer errors))``, so that the kept candidate is not built again."""
    from .validate import validate as run_validation

    seq = _use_sequential(sequential, info, choices, cal_data, emodel, large=False)
    built = _build(Source.load(original), info, emodel, choices, plan, progress=False, timings={},
                   sequential=(original, cal_all, provider) if seq else None)
    err = run_validation(original, built[0], provider=provider, input_shapes=info.input_shapes, feeds=cal_data,
                         repeats=0).rel_l2
    return err, built


def _choose_measured(original, info, source, emodel, cal_data, cal_all, sequential, *, provider, timings, **kw):
    """``objective="best"``: the min-max plan, the min-sum plan and the uniform plan at the same budget
    (same error model, same speed guard), each emitted and run on the calibration inputs; the one with
    the lowest output error is kept.  The exact solvers optimise a proxy (each layer's error, its max or
    its sum); this measures what the user sees.  The baselines are the min-max solve's.  Returns what
    :func:`_choose` returns and the kept candidate's build (:func:`_build`)."""
    tried, best, baselines = [], None, None
    for method, objective in MEASURED_CANDIDATES:
        try:
            got = _choose(info, source, emodel, None, method=method, objective=objective, timings=timings,
                          provider=provider, **dict(kw, compare=kw["compare"] and baselines is None))
        except InfeasibleBudget:
            if (method, objective) == MEASURED_CANDIDATES[0]:
                raise  # the min-max plan is the most permissive: nothing else can meet the budget
            continue
        baselines = got[3] if baselines is None else baselines
        with _timed(timings, "candidates"):
            err, built = _build_and_score(original, info, emodel, got[0], got[1], provider, cal_data, cal_all,
                                          sequential)
        tried.append({"method": method, "objective": objective, "rel_l2": err})
        if best is None or err < best[0]:
            best = (err, got, method, objective, built)
    _, (choices, used_plan, budget, _, _), method, objective, built = best
    picked = f"{method}/{objective}"
    budget.update(objective="best", picked=picked, candidates=tried)
    used_plan.budget.update(objective="best", picked=picked)
    log.info("candidate plans on the calibration data: %s; kept %s/%s",
             ", ".join(f"{t['method']}/{t['objective']} {t['rel_l2']:.4g}" for t in tried), method, objective)
    return choices, used_plan, budget, baselines, "alds", built


def _use_sequential(sequential, info, choices, cal_data, emodel, large) -> bool:
    """Whether this build refits sequentially: as asked, else while it is cheap; never without a
    decomposed layer, nor for a model over 2 GB (it re-emits the model once per layer)."""
    seq = sequential if sequential is not None else _sequential_affordable(info, choices, cal_data, emodel)
    seq = seq and any(c is not None for c in choices.values())
    if seq and large:
        log.warning("sequential calibration is skipped for a model over 2 GB")
        return False
    return bool(seq)


def _sequential_affordable(info, choices, cal_data, emodel) -> bool:
    """Sequential calibration runs the model once per decomposed layer over the
    calibration data: on by default for data-aware errors while that stays
    under :data:`SEQUENTIAL_MACS` multiply-accumulates."""
    if emodel.name != "data" or not cal_data or info.flops_total is None:
        return False
    n = len(next(iter(cal_data.values())))
    layers = sum(c is not None for c in choices.values())
    return n * layers * info.flops_total <= SEQUENTIAL_MACS


def _build(source, info, emodel, choices, plan, *, progress, timings, sequential=None):
    """Factorize and emit; returns the new model and each layer's measured error.
    ``sequential`` = (original model, calibration data, provider): data-aware
    factors are refitted layer by layer on the compressed prefix's inputs."""
    chosen = [l for l in info.candidates if choices.get(l.name) is not None]
    with _timed(timings, "factorize"):
        given = plan.factors or {}
        if sequential is not None and emodel.name == "data" and not given:
            from .sequential import sequential_factors

            original, data, provider = sequential
            factors, measured = sequential_factors(original, info, choices, data, emodel, provider=provider,
                                                   progress=progress)
        else:
            factors = {l.name: given.get(l.name) or emodel.factors(source, l, choices[l.name]) for l in chosen}
            measured = {l.name: emodel.measure(source, l, choices[l.name], factors[l.name]) for l in chosen}
    if emodel.name == "data":
        plan.factors = factors  # they depend on the calibration data: the plan carries them
    with _timed(timings, "emit"):
        new = emit(source, info, choices, factors, progress=progress)
    return new, measured


def rewrite(model_or_path, keep_params=None, keep_flops=None, keep_latency=None, method: str = "alds", *,
            plan: Plan | str | Path | None = None, schemes=None, k_max: int | None = None,
            input_shapes: dict | None = None, provider: str = "auto", validate: bool = True,
            compare: bool = True, latency_table=None, progress: bool = False, cache_dir=None,
            error: str | None = None, calibration=None, bias_correction: bool = True,
            max_output_error: float | None = None, min_speedup: float | None = None,
            allow_slower: bool = False, max_speed_retries: int = 2, sequential: bool | None = None,
            max_latency_rounds: int = 3, fill_budget: bool = True, objective: str | None = None,
            int8: bool = False, best_effort: bool = False) -> tuple[onnx.ModelProto, Report]:
    """Compress a model; returns the rewritten model and its report.

    With ``plan`` the given plan is applied as is; otherwise ``method`` selects
    under the budget (``keep_params`` by default 0.5) with the error model
    ``error`` (default ``data`` when ``calibration`` is given, else
    ``spectral``).  ``calibration`` is a dict of arrays (one per graph input,
    samples first), an ``.npz`` path or an iterable of feed dicts.

    With data-aware errors, ``sequential`` refits each layer's factors on the
    inputs of the already-compressed prefix (:mod:`onnx_alds.sequential`);
    ``None`` turns it on while it is cheap (see :func:`_sequential_affordable`).

    ``objective`` is what ``alds`` minimises: ``"max"``, the largest layer
    error (the paper's), or ``"sum"``, the sum of squared layer errors
    (:mod:`onnx_alds.select`), or ``"best"``: the min-max, min-sum and
    uniform plans are each emitted and run on the calibration inputs and the
    lowest output error is kept (:func:`_choose_measured`).  Default
    (``None``): ``"best"`` with data-aware errors under a parameter or FLOP
    budget, ``"max"`` otherwise.

    ``fill_budget`` spends what the min-max optimum leaves of the budget on the
    other layers (a lexicographic min-max; the max error is the same).

    Unless ``allow_slower``, the speed guard keeps factorizations that its
    measured model says are slower than their layer out of the selection, and
    when validation then measures the whole model slower than the input, the
    selection is redone with a stricter guard (at most ``max_speed_retries``
    times).  Past ``max_output_error`` (relative L2 of any output on the
    validation inputs) or below ``min_speedup`` the rewrite raises
    :class:`ValidationFailed`."""
    timings: dict = {}
    if int8 and not validate and (keep_latency is None or plan is not None):
        raise UsageError("--int8 times the int8 models in validation (and for --keep-latency); with "
                         "--no-validate there is nothing for it to time")
    if not validate and (max_output_error is not None or min_speedup is not None):
        raise UsageError("--max-output-error and --min-speedup need validation (drop --no-validate)")
    if keep_latency is not None and max_output_error is not None and plan is None:
        return _fastest_within(model_or_path, keep_latency, max_output_error, dict(
            method=method, schemes=schemes, k_max=k_max, input_shapes=input_shapes, provider=provider,
            compare=compare, latency_table=latency_table, progress=progress, cache_dir=cache_dir, error=error,
            calibration=calibration, bias_correction=bias_correction, min_speedup=min_speedup,
            sequential=sequential, max_latency_rounds=max_latency_rounds, fill_budget=fill_budget,
            objective=objective, int8=int8, best_effort=best_effort))
    with _timed(timings, "load"):
        source = Source.load(model_or_path)
    original = source.model
    with _timed(timings, "extract"):
        info = extract(source.model, source.graph, input_shapes)
    if plan is not None:
        plan = Plan.load(plan) if not isinstance(plan, Plan) else replace(plan)  # never edit the caller's
    moments, cal_data, cal_all = None, None, None
    if calibration is not None:
        with _timed(timings, "calibrate"):
            cal_data, moments, cal_all = calibrate(source, info, calibration, provider=provider, progress=progress,
                                                   moments=error in (None, "data") and not (plan and plan.factors))
    large = source.large
    if large and int8:
        raise UsageError("--int8 times int8 copies of the models in memory, and this model is over 2 GB; "
                         "drop --int8 and quantize the rewrite with 'onnx-alds quantize'")
    if large and source.path is not None:
        source.detach()
    emodel = error_model(error, moments=moments, cache_dir=cache_dir, bias_correction=bias_correction)
    guard = None
    if plan is None:
        metric, fraction = budget_of(keep_params, keep_flops, keep_latency)
        if not info.candidates and fraction < 1.0:
            raise InfeasibleBudget("the model has no compressible layer, so the smallest reachable "
                                   "fraction is 1.0", 1.0)
        if metric == "latency" and latency_table is None:
            from .measure.latency_table import LatencyTable  # measured per provider, cached

            with _timed(timings, "latency_table"):
                from .measure.int8 import INT8_K_MAX

                latency_table = LatencyTable.for_model(source.model, info, provider=provider,
                                                       k_max=k_max or (INT8_K_MAX if int8 else 16),
                                                       schemes=schemes, progress=progress, int8=int8)
        if metric != "latency" and not allow_slower:
            with _timed(timings, "speed_model"):
                guard = speed_guard(provider)
    # the default budget (none given) is never slower than the input: where the speed guard or the
    # measured model says keep-params 0.5 is slower, it compresses less, down to nothing
    used_objective = _objective_for(objective, method, emodel, cal_data, keep_latency, large)
    default_budget = plan is None and keep_params is None and keep_flops is None and keep_latency is None
    relax = list(DEFAULT_RELAXED) if default_budget and guard is not None else []
    attempt, rounds, result, first = 0, 0, None, None
    solved_by = None  # --keep-latency: the table that solved the kept round's plan
    learned_floor = None  # the corrected table's floor, where a cached correction was dropped
    lat_fraction, kept_fraction = keep_latency, keep_params
    while True:
        built = None  # a candidate that objective "best" has already built
        try:
            if kept_fraction == 1.0 and default_budget:
                raise InfeasibleBudget("nothing left to relax", 1.0)
            pick = dict(keep_params=kept_fraction, keep_flops=keep_flops, keep_latency=lat_fraction,
                        schemes=schemes, k_max=k_max, compare=compare, latency_table=latency_table,
                        progress=progress, guard=guard, fill=fill_budget)
            if used_objective == "best" and plan is None:
                choices, used_plan, budget, baselines, used_method, built = _choose_measured(
                    original, info, source, emodel, cal_data, cal_all, sequential, provider=provider,
                    timings=timings, **pick)
            else:
                choices, used_plan, budget, baselines, used_method = _choose(
                    info, source, emodel, plan, method=method, provider=provider, timings=timings,
                    objective=used_objective, **pick)
        except InfeasibleBudget as e:
            if result is None and latency_table is not None and keep_latency is not None \
                    and (latency_table.beta != 1.0 or latency_table.penalty):
                # a correction cached by an earlier run (at another budget, on another day's load) is a
                # starting point, not a verdict: solve the table as measured before calling the budget
                # infeasible (the same answer on a first run and a rerun)
                log.info("keep-latency %g is past the floor with the corrections learned so far (savings "
                         "scaled by %.3f, %d layers' costs); solving the table as measured", keep_latency,
                         latency_table.beta, len(latency_table.penalty))
                learned_floor = latency_table.floor()
                latency_table = latency_table.with_context(latency_table.context, {}).with_beta(1.0)
                continue
            if result is None and learned_floor is not None:
                # infeasible as measured too: the floor to ask for is the one measured inside the model
                floor = max(learned_floor, e.smallest_fraction)
                timed = (f" ({e.smallest_fraction:.4f} as the table timed it)"
                         if floor > e.smallest_fraction + 5e-5 else "")
                raise InfeasibleBudget(
                    f"the budget cannot be met: the smallest reachable fraction is {floor:.4f} with each layer's "
                    f"cost measured inside the model by earlier runs{timed}", floor) from None
            if relax and (result is None or (result[1].speedup or 0) < 1.0):
                kept_fraction = relax.pop(0)
                log.info("the default budget %s; trying keep-params %g", _why(e), kept_fraction)
                continue
            if default_budget and guard is not None and (result is None or (result[1].speedup or 0) < 1.0):
                choices, used_plan, budget, baselines, used_method = _unchanged(info, guard, int8)
            elif result is None:
                raise
            else:
                log.info("a stricter selection cannot meet the budget; keeping the previous one")
                break
        if default_budget and kept_fraction is not None:
            budget["default_relaxed"] = {"requested": DEFAULT_FRACTION, "kept": kept_fraction}
        if plan is None and keep_latency is not None:
            budget["beta"] = latency_table.beta
            if lat_fraction != keep_latency:  # the user's budget stays what the report says
                budget.update(solved_fraction=lat_fraction, fraction=keep_latency,
                              target=keep_latency * budget["total_before"])
        seq = _use_sequential(sequential, info, choices, cal_data, emodel, large)
        new, measured = built or _build(source, info, emodel, choices, used_plan, progress=progress,
                                        timings=timings, sequential=(original, cal_all, provider) if seq else None)
        budget["sequential"] = bool(seq and emodel.name == "data")
        source.graph = None  # the numpy weights are no longer needed: free them before onnxruntime loads
        if large:
            trim_memory()
        report = _check_and_validate(source, original, new, info, choices, measured, emodel, used_plan, budget,
                                     baselines, used_method, latency_table=latency_table, validate=validate,
                                     provider=provider, cal_data=cal_data, timings=timings, int8=int8)
        if budget.get("measured_speedup") is not None and plan is None:
            # --keep-latency, measured: re-solve the same budget with the table corrected by what the
            # model really ran, both ways (short of the target: compress more; far past it: less)
            target = 1.0 / keep_latency
            got = budget["measured_speedup"]
            budget["rounds"] = rounds + 1

            def rank(rep):  # meeting the target first, then the closest to it
                g = rep.budget["measured_speedup"]
                return (g < target * (1 - LATENCY_TOLERANCE), abs(np.log(g / target)))

            lo, hi = target * (1 - LATENCY_TOLERANCE), target * (1 + LATENCY_OVERSHOOT)
            short, past = lo * (1 - REMEASURE_BAND) <= got < lo, hi < got <= hi * (1 + REMEASURE_BAND)
            if (short or past) and not large:
                # just off the target: this machine's noise is of that size, so the plan is solved again
                # only when a second interleaved measurement says so too (a rerun of a plan that met its
                # target keeps it): short, the faster of the two counts (load only ever adds time); past
                # it, the slower
                from .measure.latency_table import measure_speedup

                with _timed(timings, "latency"):
                    again = measure_speedup(original, new, latency_table, info)
                budget["remeasured"] = "faster" if short else "slower"  # the one kept, of two measurements
                if (again["measured_speedup"] > got) == short:
                    budget.update(again)
                    got = again["measured_speedup"]
            if result is None or rank(report) < rank(result[1]):
                result = (new, report)
                solved_by = latency_table  # remembered for the next run: it solves this same plan first
            on_target = lo <= got <= hi
            if on_target or rounds + 1 >= max_latency_rounds or large:
                break
            # layers timed alone do not add up to the model: correct the table by what this
            # selection saved inside the whole model against what the table predicted it would save;
            # where it saved nothing (every extra node cost more than its layer saved), no scaling of
            # the savings can say how much more to compress: ask the table for the missing ratio instead
            if latency_table.context:
                # layer by layer first: the profiler times each factorized layer inside the model
                from .measure.latency_table import profile_pair

                with _timed(timings, "profile"):
                    latency_table = latency_table.learned(choices, *profile_pair(original, new, latency_table, info))
            learned = latency_table.corrected(latency_table.predicted_ms(choices), budget["measured_ms_before"],
                                              budget["measured_ms"])
            rounds += 1
            if got > 1.0 and learned.beta > BETA_RANGE[0]:
                log.info("measured %.2fx for a target of %.2fx (predicted %.2fx); solving again with the "
                         "table's savings scaled by %.3f", got, target, budget["predicted_speedup"], learned.beta)
                latency_table = learned
            elif latency_table.context:
                log.info("measured %.2fx for a target of %.2fx (predicted %.2fx); solving again with the "
                         "layers' costs measured inside the model", got, target, budget["predicted_speedup"])
            else:
                lat_fraction = min(1.0, lat_fraction * got / target)
                log.info("measured %.2fx for a target of %.2fx; solving again for keep-latency %.3f",
                         got, target, lat_fraction)
            source = Source.load(original)
            continue
        if budget.get("unchanged"):
            result = (new, report)
            break
        # a retry counts only when it is not slower, and not much less accurate than the first attempt
        # (near its floor a stricter guard can meet a budget only with a few layers at tiny ranks)
        accurate = first is None or _err(report) <= max(_err(first), WARN_OUTPUT_ERROR)
        if result is None or ((report.speedup or 0) >= 1.0 and accurate):
            result = (new, report)
        first = first if first is not None else report
        sp = report.speedup
        if guard is None or sp is None or large or (sp >= 1.0 and result[1] is report):
            break
        if attempt < max_speed_retries:
            attempt += 1
            log.info("the rewritten model measured %.2fx; redoing the selection with a stricter speed guard", sp)
            guard = guard.stricter()
        elif relax:
            kept_fraction = relax.pop(0)
            log.info("the rewritten model measured %.2fx at the default budget; trying keep-params %g",
                     sp, kept_fraction)
        elif default_budget:
            kept_fraction = 1.0  # nothing is faster here: write the model with no layer decomposed
        else:
            break
        source = Source.load(original)  # emission edited the graph: start from the input again
    new, report = result
    if plan is None and keep_latency is not None and not large and not int8 \
            and report.budget["measured_speedup"] < (1 - LATENCY_TOLERANCE) / keep_latency:
        # the table's plans fell short (on small models a layer's time is a few µs, and timed alone it
        # says little of the layer inside the model): try the speed guard's plans, measured
        better = _guarded_alternative(original, info, emodel, cal_data, cal_all, sequential, provider=provider,
                                      method=method, keep_latency=keep_latency, table=latency_table, schemes=schemes,
                                      k_max=k_max, progress=progress, timings=timings,
                                      beat=report.budget["measured_speedup"], validate=validate)
        if better is not None:
            new, report = better
    if guard is not None:
        report.budget["speed_guard_retries"] = attempt
    relaxed = report.budget.get("default_relaxed")
    if relaxed and not report.budget.get("unchanged"):
        report.budget.setdefault("warnings", []).append(
            f"the default budget keep-params {relaxed['requested']:g} ran slower than the input on "
            f"{guard.provider}{' as int8' if int8 else ''}; kept {relaxed['kept']:g} of the parameters instead "
            f"(--keep-params F to insist)")
    if report.budget.get("measured_speedup") is not None:
        report.budget["rounds_tried"] = rounds + 1  # `rounds`: the round whose model was kept
        if latency_table is not None and plan is None:
            # the next run on this model starts from the table its kept plan was solved with, so that
            # a rerun of the same command solves the same plan first (and keeps it, where it measures
            # on target again); the route's plans were not solved by the table: it is kept as it ended
            (solved_by if solved_by is not None and "route" not in report.budget else latency_table).remember()
        latency_verdict(report.budget, keep_latency, latency_table, best_effort=best_effort)
    if validate:
        from .validate import Validation, gate

        v = Validation(**report.validation)
        int8_speedup = report.budget.get("measured_speedup") if int8 else None
        report.budget.setdefault("warnings", []).extend(gate(v, max_output_error=max_output_error,
                                                             min_speedup=min_speedup,
                                                             unchanged=bool(report.budget.get("unchanged")),
                                                             speedup=int8_speedup))
    return new, report


GUARDED_FRACTIONS = (0.9, 0.7, 0.5, 0.3)  # --keep-latency's second route: these keep-params plans, in turn


def _guarded_alternative(original, info, emodel, cal_data, cal_all, sequential, *, provider, keep_latency, table,
                         schemes, k_max, progress, timings, beat, validate, method="alds"):
    """``--keep-latency F`` where the latency table's plans measured short of ``1/F``: the plans the
    speed guard admits at keep-params 0.9, 0.7, 0.5 and 0.3 (its per-MAC and per-node model is
    measured on this provider, and keeps the default rewrite faster than its input), each built and
    timed against the original, interleaved.  Returns the rewrite and report of the first (the most
    parameters kept, so the least error) that meets the target or, where none does, that runs within
    5 % of the fastest of them (closer is this machine's noise), if it beats ``beat`` (the table's
    best); else None."""
    from .measure.latency_table import measure_speedup

    guard = speed_guard(provider)
    if guard is None:
        return None
    target = (1 - LATENCY_TOLERANCE) / keep_latency
    tried = []
    for kp in GUARDED_FRACTIONS:
        source = Source.load(original)
        try:
            choices, used_plan, budget, baselines, method = _choose(
                info, source, emodel, None, keep_params=kp, keep_flops=None, keep_latency=None, method=method,
                schemes=schemes, k_max=k_max, provider=provider, compare=False, latency_table=None,
                progress=progress, timings=timings, guard=guard)
        except InfeasibleBudget:
            continue
        if not any(c is not None for c in choices.values()):
            continue
        seq = _use_sequential(sequential, info, choices, cal_data, emodel, False)
        new, measured = _build(source, info, emodel, choices, used_plan, progress=progress, timings=timings,
                               sequential=(original, cal_all, provider) if seq else None)
        with _timed(timings, "latency"):
            got = measure_speedup(original, new, table, info)["measured_speedup"]
        log.info("keep-latency %g: the speed guard's plan at keep-params %g measured %.2fx", keep_latency, kp, got)
        tried.append((got, kp, source, new, choices, measured, used_plan, budget, baselines, method))
        if got >= target:
            break
    if not tried or max(t[0] for t in tried) <= beat:
        return None
    enough = min(target, (1 - LATENCY_TOLERANCE) * max(t[0] for t in tried))
    got, kp, source, new, choices, measured, used_plan, budget, baselines, method = next(
        t for t in tried if t[0] >= enough)
    predicted_ms = table.predicted_ms(choices)
    predicted_ms = predicted_ms if np.isfinite(predicted_ms) else float("nan")  # a rank the table did not time
    budget.update(metric="latency", fraction=keep_latency, target=keep_latency * table.model_ms,
                  predicted=predicted_ms, total_before=table.model_ms, route=f"speed guard, keep-params {kp:g}",
                  beta=table.beta, rounds=1)
    budget.update(table.summary(predicted_ms))
    # measured once more there, on purpose: the plan kept is the one that measured well, and a fresh
    # measurement of it is what the report and the verdict judge
    report = _check_and_validate(source, original, new, info, choices, measured, emodel, used_plan, budget,
                                 baselines, method, latency_table=table, validate=validate, provider=provider,
                                 cal_data=cal_data, timings=timings)
    return new, report


def latency_verdict(budget: dict, keep_latency: float, table, best_effort: bool = False) -> None:
    """What ``--keep-latency F`` does with its kept rewrite, measured at ``budget["measured_speedup"]``
    against the target ``1/F``: a slower one, or one more than 15 % short (:data:`LATENCY_REFUSE`,
    unless ``best_effort``), is refused (:class:`InfeasibleBudget`: nothing is written, and the message
    gives the fraction that the table corrected inside the model can reach); one more than 5 % short
    is kept with a warning."""
    target, got = 1.0 / keep_latency, budget["measured_speedup"]
    where = f"in {budget.get('rounds_tried', 1)} rounds on {budget.get('provider', 'the provider')}"
    if got < 1.0:  # a latency budget is never met by a slower model
        raise InfeasibleBudget(
            f"--keep-latency {keep_latency:g}: no rewrite tried ran faster than the input (the fastest measured "
            f"{got:.2f}x {where}, the table predicted {budget['predicted_speedup']:.2f}x); nothing was written", 1.0)
    if got < target * LATENCY_REFUSE and not best_effort:
        floor = table.floor() if table is not None else 1.0 / got
        raise InfeasibleBudget(
            f"--keep-latency {keep_latency:g} asks for {target:.2f}x; the fastest rewrite measured {got:.2f}x {where}"
            f", and with each layer timed inside the model the smallest reachable fraction is {floor:.3f} "
            f"(measured: {1.0 / got:.3f}); nothing was written (--best-effort writes it)", max(floor, 1.0 / got))
    if got < target * (1 - LATENCY_TOLERANCE):
        budget.setdefault("warnings", []).append(
            f"--keep-latency {keep_latency:g} asks for {target:.2f}x; the closest measured rewrite runs "
            f"{got:.2f}x (the table predicted {budget['predicted_speedup']:.2f}x)")


def _fastest_within(model_or_path, fraction: float, max_error: float, kw: dict, probes: int = 5):
    """``--keep-latency F --max-output-error X``: the output error is the
    constraint and latency the objective.  Returns the fastest rewrite found
    whose output error on the validation inputs is at most X, searching kept
    latency fractions from F (the fastest it tries) up to 1 by bisection;
    raises ValidationFailed when even the least compression exceeds X."""
    tried = []

    def probe(f):
        try:
            new, rep = rewrite(model_or_path, keep_latency=f, **kw)
        except InfeasibleBudget:
            return None
        tried.append((f, rep.validation["rel_l2"]))
        return (new, rep) if rep.validation["rel_l2"] <= max_error else None

    best = probe(fraction)
    if best is None:
        lo, hi = fraction, 1.0
        for _ in range(probes):
            mid = (lo + hi) / 2
            got = probe(mid)
            if got is not None:
                best, hi = got, mid
            else:
                lo = mid
    if best is None:
        shown = ", ".join(f"{f:.3f}: {e:.3g}" for f, e in tried) or "none feasible"
        raise ValidationFailed(f"no rewrite with --keep-latency between {fraction:g} and 1 keeps the output error "
                               f"within --max-output-error {max_error:g} (kept latency: error {shown}); "
                               f"nothing was written")
    new, rep = best
    rep.budget["error_bound"] = {"max_output_error": max_error, "tried": [list(t) for t in tried]}
    return new, rep


def _check_and_validate(source, original, new, info, choices, measured, emodel, plan, budget, baselines, method, *,
                        latency_table, validate, provider, cal_data, timings, int8=False) -> Report:
    with temp_dir("onnx-alds-") as tmp:
        # onnxruntime and the checker take models over 2 GB only as files with external data
        orig_ref, new_ref = original, new
        if source.large or proto_size(new) > EXTERNAL_DATA_THRESHOLD:
            orig_ref = Path(source.path) if source.path is not None else Path(tmp) / "original.onnx"
            if source.path is None:
                save_model(original, orig_ref, external_data=True)
            new_ref = Path(tmp) / "rewritten.onnx"
            save_model(new, new_ref, external_data=True)
        with _timed(timings, "check"):
            if isinstance(new_ref, Path):
                check_model_file(new_ref, "the rewritten model")
            else:
                check_rewritten(original, new)
        if budget.get("metric") == "latency" and latency_table is not None:  # not for an applied plan
            from .measure.latency_table import measure_speedup

            with _timed(timings, "latency"):
                budget.update(measure_speedup(orig_ref, new_ref, latency_table, info))
        with _timed(timings, "count"):
            flops_after = model_flops(new, info.input_shapes) if info.flops_total is not None else None
        report = build_report(info, choices, measured, method=method, budget=budget, error_model=emodel,
                              params_after=count_params(new), flops_after=flops_after, in_path=source.path,
                              timings=timings, baselines=baselines)
        report.plan = plan
        from .emit import dropped

        if dropped(original):
            report.budget.setdefault("warnings", []).extend(f"dropped {d}" for d in dropped(original))
            report.budget["dropped"] = dropped(original)
        if validate:
            from .validate import validate as run_validation

            with _timed(timings, "validate"):
                v = run_validation(orig_ref, new_ref, provider=provider, input_shapes=info.input_shapes,
                                   feeds=cal_data, low_memory=isinstance(new_ref, Path), int8=int8,
                                   int8_copies=getattr(latency_table, "int8_copies", None))
            report.validation = v.to_dict()
    return report


def apply_plan(model_or_path, plan, *, input_shapes: dict | None = None) -> onnx.ModelProto:
    """Apply a plan (a :class:`Plan`, its dict or a JSON path) without selection."""
    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    new, _ = rewrite(model_or_path, plan=plan, input_shapes=input_shapes, validate=False, compare=False)
    return new


__all__ = ["rewrite", "apply_plan", "inspect", "analyze", "select", "calibrate", "ValidationFailed"]
