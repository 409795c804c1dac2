"""The stages of one rewrite, in order:

    load → extract → calibrate → error model ─┐
                                               ├→ choose (select, or a plan as given) → build (factorize,
    cost model (+ speed guard) ────────────────┘    emit) → check, measure, validate → finish (gates)

:func:`prepare` runs the first four once and returns a :class:`Run` (the state every later stage
and every policy shares); a policy (:mod:`onnx_alds.policy`) calls :func:`choose`, :func:`build`
and :func:`check` as often as its budget needs, and :func:`finish` gates the attempt it keeps.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from math import prod
from pathlib import Path

import numpy as np
import onnx

from ..argtypes import check_names
from ..calibration import collect_moments, first_samples, load_checked, model_inputs, taps_for
from ..cost import cost_model, full_rank
from ..emit import dropped, emit
from ..error_model import error_model
from ..errors import InfeasibleBudget, UsageError, ValidationFailed
from ..extract import ModelInfo, count_params, extract, model_flops
from ..factorize import per_layer
from ..io import EXTERNAL_DATA_THRESHOLD, Source, check_model_file, check_rewritten, proto_size, save_model, \
    temp_dir, trim_memory
from ..measure.int8 import Int8Copies
from ..measure.latency_table import measure_speedup, profile_pair
from ..measure.speed import SpeedModel
from ..metric import TaskMetric
from ..options import RewriteOptions, objective_for
from ..plan import LayerPlan, Plan, resolve
from ..report import Report, build_report
from ..select import Config, Selection, layer_configs, layer_options, solve
from ..sequential import sequential_factors
from ..validate import gate, same_graph, validate
from .attempt import Attempt, Built, Choice, LatencyMeasurement, build_key

log = logging.getLogger(__name__)

# sequential calibration by default while its sweep stays this cheap (sequential_macs): tens of seconds
# on 2 cores; on for the real models of docs/real-models.md with 192-256 samples, the shipped ResNet20
SEQUENTIAL_MACS = 1e12


@contextmanager
def timed(timings: dict, stage: str):
    """Add the time spent in the block to ``timings[stage]`` (seconds; the report's ``timings_s``)."""
    t0 = time.perf_counter()
    yield
    timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - t0, 4)


class Measurer:
    """How a policy times a rewrite against its original: the whole models side by side
    (:meth:`speedup`) and each layer inside them (:meth:`profile`), with a latency table's settings.
    A policy only measures through its run's measurer, so a test can hand it a deterministic one."""

    def speedup(self, original, new, table, info, choices: dict) -> LatencyMeasurement:
        m = measure_speedup(original, new, table, info)
        return LatencyMeasurement(m["measured_ms_before"], m["measured_ms"], m["threads"])

    def profile(self, original, new, table, info, choices: dict) -> tuple[dict, dict]:
        return profile_pair(original, new, table, info)


@dataclass
class Run:
    """One rewrite's shared state: the options, the input (``original``, never edited; ``source``, the
    graph the next build edits), its analysis, calibration data and error model."""

    opts: RewriteOptions
    source: Source
    original: onnx.ModelProto
    info: ModelInfo
    emodel: object
    cal_data: dict | None = None  # validation feeds (at most 256 samples)
    cal_all: object = None  # all the calibration data (sequential refit)
    timings: dict = field(default_factory=dict)
    int8_copies: Int8Copies | None = None  # --int8: the copies timed, kept for the whole rewrite
    objective: str = "max"  # what selection minimises (:func:`onnx_alds.options.objective_for`)
    measurer: Measurer = field(default_factory=Measurer)
    cal_split: str = "random inputs"  # what the validation inputs are (held-out calibration samples, ...)
    reuse: Built | None = None  # a build a policy kept to be used again (the default search's kept probe)
    metric: TaskMetric | None = None  # --metric-script, with the original's score

    def score(self, built: Built) -> float | None:
        """The task metric of a build (once per build; None without --metric-script)."""
        if self.metric is not None and built.score is None:
            with self.stage("metric"):
                built.score = self.metric.score(built.model)
        return built.score

    @property
    def large(self) -> bool:
        return self.source.large

    def fresh_source(self) -> None:
        """Emission edits the graph: the next build starts from the input again (whose file, if it
        came from one, still stands for it)."""
        path = self.source.path
        self.source = Source.load(self.original)
        self.source.path = path

    def stage(self, name: str):
        return timed(self.timings, name)


def analyze(model_or_path, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, Source, ModelInfo]:
    """The model (a path, a ``ModelProto`` or a loaded :class:`Source`), its source and its layers."""
    source = model_or_path if isinstance(model_or_path, Source) else Source.load(model_or_path)
    return source.model, source, extract(source.model, source.graph, input_shapes)


HOLD_OUT = 4  # one calibration sample in this many is held back to judge what was fitted on the rest,
MIN_HOLD_OUT = 16  # where there are at least this many samples (fewer: judged on the samples fitted on)


def calibrate(source: Source, info: ModelInfo, data, *, provider: str = "auto", progress: bool = False,
              moments: bool = True, max_validation_samples: int = 256, hold_out: bool = False):
    """From the loaded and checked calibration ``data`` (:func:`prepare`), the validation feeds (at
    most ``max_validation_samples``, name → array), with ``moments`` the second moments of every
    candidate layer's input patches (else None), the data fitted on, and what the validation feeds
    are.  ``hold_out``: the last quarter of an array dataset (at least :data:`MIN_HOLD_OUT` samples) is
    held back for validation and nothing is fitted on it."""
    n = len(next(iter(data.values()))) if isinstance(data, dict) and data else 0
    if hold_out and n >= MIN_HOLD_OUT:
        h = min(max_validation_samples, n // HOLD_OUT)
        feeds = {k: v[n - h:] for k, v in data.items()}
        data = {k: v[:n - h] for k, v in data.items()}
        judged = f"{h} held-out calibration samples"
    else:
        feeds = first_samples(data, max_validation_samples)
        judged = "the calibration samples (also fitted on)"
    if not moments:
        return feeds, None, data, judged
    model = source.path if source.large and source.path is not None else source.model
    return feeds, collect_moments(model, taps_for(info.candidates), data, provider=provider,
                                  progress=progress), data, judged


def prepare(model_or_path, opts: RewriteOptions) -> Run:
    """Load, extract, calibrate and pick the error model: the stages every attempt shares."""
    timings: dict = {}
    with timed(timings, "load"):
        source = Source.load(model_or_path)
    original = source.model
    check_names("--output-kind", opts.validation.output_kinds, (o.name for o in original.graph.output), "output")
    c, plan = opts.calibration, opts.budget.plan
    data, shapes = None, opts.input_shapes
    if c.data is not None:
        with timed(timings, "calibrate"):
            data = load_checked(c.data, source.model, opts.input_shapes)
            shapes = shapes_from_data(source.model, opts.input_shapes, data)
    with timed(timings, "extract"):
        info = extract(source.model, source.graph, shapes)
    moments, cal_data, cal_all, judged = None, None, None, "random inputs"
    if data is not None:
        with timed(timings, "calibrate"):
            cal_data, moments, cal_all, judged = calibrate(source, info, data, provider=opts.validation.provider,
                                                           progress=opts.progress, moments=_needs_moments(c.error, plan),
                                                           hold_out=c.hold_out)
    if source.large and opts.latency.int8:
        raise UsageError("--int8 times int8 copies of the models in memory, and this model is over 2 GB; "
                         "drop --int8 and quantize the rewrite with 'onnx-alds quantize'")
    if source.large and source.path is not None:
        source.detach()
    emodel = error_model(c.error, moments=moments, cache_dir=opts.cache_dir, bias_correction=c.bias_correction)
    if c.sensitivity:
        emodel = _sensitivity_weighted(emodel, source, info, cal_all, opts, timings)
    if plan is None and not info.candidates and opts.budget.fraction < 1.0 and not opts.budget.default:
        raise InfeasibleBudget(f"{no_layer_reason(info)}, so the smallest reachable fraction is 1.0", 1.0)
    objective = objective_for(opts, emodel.name, bool(cal_data), source.large)
    metric = TaskMetric.from_option(opts.validation.metric, opts.validation.max_metric_drop)
    if metric is not None:
        with timed(timings, "metric"):
            metric.measure_original(source.path if source.path is not None else original)
    return Run(opts, source, original, info, emodel, cal_data, cal_all, timings,
               Int8Copies() if opts.latency.int8 else None, objective, cal_split=judged, metric=metric)


def shapes_from_data(model: onnx.ModelProto, given: dict | None, data) -> dict | None:
    """The shapes to analyse the model at: ``--input-shape`` as given, and for every other input whose
    dims the model leaves open beyond the batch axis (a sequence length, an image size), a calibration
    sample's, at batch 1.  FLOPs, the speed guard, the latency table and the sequential refit's cost then
    see the sizes the model runs at on this data, not a placeholder (32 for every open dim)."""
    sample = data if isinstance(data, dict) else data.first()
    shapes = dict(given or {})
    for name, (_, dims) in model_inputs(model).items():
        got = sample.get(name)
        if name in shapes or got is None or not dims or len(got.shape) != len(dims):
            continue
        if any(not (isinstance(d, int) and d > 0) for d in dims[1:]):
            shapes[name] = [1] + [int(n) for n in got.shape[1:]]
    return shapes or None


def _needs_moments(error: str | None, plan: Plan | None) -> bool:
    """Moments are collected for the data-aware error model: asked for, or by default unless a plan
    applied as given carries its factors (then nothing is fitted and weight errors describe it)."""
    return error == "data" or (error is None and not (plan is not None and plan.factors))


def speed_guard(provider: str = "auto", threads: int = 2):
    """The measured (cached) speed model that keeps slower factorizations out
    (:mod:`onnx_alds.measure.speed`); None, with a warning, without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("no speed guard: onnxruntime is not installed")
        return None
    return SpeedModel.for_provider(provider, threads)


def options_for(info: ModelInfo, source: Source, emodel, cmodel, configs, *, progress=False, admissible=None):
    """Error curves (error model) and costs (cost model) → each layer's options."""
    cands = info.candidates
    configs = {l.name: [(k, s) for k, s in configs[l.name] if emodel.offers(l, k, s)] for l in cands}
    if admissible is not None:  # no curve for a (k, scheme) the speed guard admits at no rank (CPU convs: k > 1)
        configs = {l.name: [(k, s) for k, s in configs[l.name]
                            if np.asarray(admissible(l, k, s, np.arange(1, full_rank(l.geometry, k, s) + 1))).any()]
                   for l in cands}
    curves = emodel.curves(source, cands, configs, progress=progress)

    def costs(layer):
        extra = emodel.extra_params(layer) if cmodel.name == "params" else 0
        if not extra:
            return partial(cmodel.configs, layer)
        return lambda k, s, ranks: cmodel.configs(layer, k, s, ranks) + extra  # a bias the factors add

    return [layer_options(l.name, curves[l.name], cmodel.dense(l), costs(l), full_rank(l.geometry, 1, "s0"),
                          partial(admissible, l) if admissible is not None else None) for l in cands]


def select(info: ModelInfo, source: Source, emodel, *, metric: str, fraction: float, method: str = "alds",
           schemes=None, k_max=None, latency_table=None, compare: bool = True, progress: bool = False,
           timings: dict | None = None, admissible=None, fill: bool = True,
           objective: str = "max") -> tuple[Selection, dict]:
    """Run the selector; returns the selection and the objective value (max error, or root-sum-square
    error for ``objective="sum"``) the other methods reach at the same budget with the same error
    model."""
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
    with timed(timings, "errors"):
        options = options_for(info, source, emodel, cmodel, configs, progress=progress, admissible=admissible)
    with timed(timings, "select"):
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


def choose(run: Run, *, metric: str, fraction: float, guard=None, table=None, method: str | None = None,
           objective: str | None = None, compare: bool | None = None, schemes=None) -> Choice:
    """Selection under one budget (or the plan the options apply as given) → a :class:`Choice`.
    ``method``, ``objective``, ``compare`` and ``schemes`` default to the options'."""
    opts, sel_opts = run.opts, run.opts.selection
    plan = opts.budget.plan
    if plan is not None:
        with run.stage("errors"):
            choices = choices_from_plan(plan, run.info, run.source, run.emodel)
        return Choice(choices, plan, dict(plan.budget, applied_plan=True), {}, plan.budget.get("method", "plan"))
    method = method or sel_opts.method
    objective = objective or run.objective
    try:
        sel, baselines = select(run.info, run.source, run.emodel, metric=metric, fraction=fraction, method=method,
                                schemes=schemes or sel_opts.schemes, k_max=sel_opts.k_max, latency_table=table,
                                compare=sel_opts.compare if compare is None else compare, progress=opts.progress,
                                timings=run.timings, fill=sel_opts.fill_budget, objective=objective,
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
        budget.update(table.summary(sel.details["predicted_ms"]))
    return Choice(sel.choices, plan_from_selection(sel, run.info, run.emodel.name), budget, baselines, method,
                  predicted_ms=sel.details.get("predicted_ms"))


def _sensitivity_weighted(emodel, source: Source, info: ModelInfo, fitted, opts: RewriteOptions, timings: dict):
    """The data-aware error model weighted by each layer's output sensitivity (:mod:`onnx_alds.sensitivity`),
    probed on the first samples of the data the factors are fitted on."""
    from ..sensitivity import PROBE_SAMPLES, WeightedError, layer_sensitivity

    if fitted is None or emodel.name != "data":
        raise UsageError("--sensitivity weighs the data-aware errors: it needs --calibration (and the data error "
                         "model)")
    if source.large or not info.candidates:
        log.warning("--sensitivity skipped: %s", "the model is over 2 GB" if source.large else "no compressible layer")
        return emodel
    with timed(timings, "sensitivity"):
        weights = layer_sensitivity(source.model, source, info.candidates, emodel,
                                    first_samples(fitted, PROBE_SAMPLES), provider=opts.validation.provider,
                                    progress=opts.progress)
    top = sorted(weights.items(), key=lambda kv: -kv[1])
    log.info("output sensitivity per unit of layer error: highest %s, lowest %s",
             ", ".join(f"{n} {w:.2f}" for n, w in top[:3]), ", ".join(f"{n} {w:.2f}" for n, w in top[-3:]))
    return WeightedError(emodel, weights)


def no_layer_reason(info: ModelInfo) -> str:
    """Why a model has no compressible layer, as the start of one sentence: the commonest reasons its
    layers were skipped (a layer inside an If branch, a weight computed at run time, ...), or that
    it has no layer of a kind the rewrite knows (an int8 ConvInteger model, say)."""
    if not info.layers:
        return ("the model has no compressible layer (no Conv, ConvTranspose, Gemm or MatMul with a float "
                "weight; a quantized model is compressed before it is quantized)")
    reasons = Counter(l.reason or l.status for l in info.layers if l.status != "candidate")
    (first, n), = reasons.most_common(1)
    rest = sum(reasons.values()) - n
    more = f"; {rest} more for other reasons" if rest else ""
    return f"the model has no compressible layer ({n} of its {len(info.layers)} layers {first}{more})"


def unchanged(run: Run, guard, why: str) -> Choice:
    """The default budget's last resort: the model is written with no layer decomposed, ``why`` (no
    factorization measured faster than its layer on this provider, or none within the output
    tolerance), and says so."""
    int8 = " as int8" if run.opts.latency.int8 else ""
    log.info("the model is written with no layer decomposed: %s%s", why, int8)
    budget = {"metric": "params", "fraction": 1.0, "unchanged": True,
              "speed_guard": guard.summary() if guard is not None else None,
              "warnings": [f"no layer was decomposed: {why}{int8}"
                           + ("; --keep-params F compresses anyway" if run.info.candidates else "")]}
    plan = Plan(layers=[], budget={"metric": "params", "fraction": 1.0, "method": "none"})
    return Choice({l.name: None for l in run.info.candidates}, plan, budget, {}, "alds", unchanged=True)


def sequential_macs(info: ModelInfo, choices: dict, n: int) -> float:
    """Multiply-accumulates of one sequential sweep over ``n`` samples (:mod:`onnx_alds.sequential`): the
    original and the compressed model run once each, and each decomposed layer sums two Gram matrices
    of its input patches (``positions × d²`` a sample, ``d = c·κ1·κ2``: its MACs times ``d/f``)."""
    grams = sum(l.geometry.flops * l.geometry.c * prod(l.geometry.kernel) / l.geometry.f
                for l in info.candidates if choices.get(l.name) is not None and l.geometry.flops is not None)
    return n * 2 * (info.flops_total + grams)


def sequential_affordable(info: ModelInfo, choices: dict, cal_data, emodel, cal_all=None) -> bool:
    """Sequential calibration runs the data fitted on (``cal_all``; else the validation feeds
    ``cal_data``) through the model once (one sweep): on by default for data-aware errors while that
    stays under :data:`SEQUENTIAL_MACS` multiply-accumulates."""
    if emodel.name != "data" or not cal_data or info.flops_total is None:
        return False
    data = cal_all if isinstance(cal_all, dict) and cal_all else cal_data
    return sequential_macs(info, choices, len(next(iter(data.values())))) <= SEQUENTIAL_MACS


def use_sequential(run: Run, choices: dict) -> bool:
    """Whether a build refits sequentially: as asked, else while it is cheap; never without a
    decomposed layer, nor for a model over 2 GB."""
    asked = run.opts.calibration.sequential
    seq = asked if asked is not None else sequential_affordable(run.info, choices, run.cal_data, run.emodel,
                                                                run.cal_all)
    seq = seq and any(c is not None for c in choices.values())
    if seq and run.large:
        log.warning("sequential calibration is skipped for a model over 2 GB")
        return False
    return bool(seq)


def build(run: Run, choice: Choice, source: Source | None = None, *, sequential: bool = True) -> Built:
    """Factorize and emit (from ``source``, by default the run's); data-aware factors are refitted
    on the compressed prefix's inputs where :func:`use_sequential` says so, unless ``sequential`` is
    false (a plan judged one-shot, :mod:`.candidates`)."""
    if choice.built is not None:
        return choice.built
    source = source or run.source
    emodel, choices, plan = run.emodel, choice.choices, choice.plan
    chosen = [l for l in run.info.candidates if choices.get(l.name) is not None]
    seq = sequential and use_sequential(run, choices)
    choice.budget["sequential"] = bool(seq and emodel.name == "data")
    key = build_key(choices, seq) if not plan.factors else None
    if key is not None and run.reuse is not None and run.reuse.key == key:  # built already in this run
        if emodel.name == "data":
            plan.factors = run.reuse.factors
        return run.reuse
    with run.stage("factorize"):
        given = plan.factors or {}
        if seq and emodel.name == "data" and not given:
            factors, measured = sequential_factors(run.original, run.info, choices, run.cal_all, emodel,
                                                   provider=run.opts.validation.provider, progress=run.opts.progress)
            weigh = getattr(emodel, "weigh", None)  # --sensitivity: measured as the predictions are
            measured = weigh(measured) if weigh is not None else measured
        else:
            factors, measured = factor_layers(emodel, source, chosen, choices, given)
    if emodel.name == "data":
        plan.factors = factors  # they depend on the calibration data: the plan carries them
    with run.stage("emit"):
        new = emit(source, run.info, choices, factors, progress=run.opts.progress)
    return Built(new, measured, factors if emodel.name == "data" else None, key)


def factor_layers(emodel, source: Source, layers: list, choices: dict, given: dict) -> tuple[dict, dict]:
    """Each layer's factors (``given``'s where it has them) and their measured error, the layers
    spread over the cores (:func:`~onnx_alds.factorize.per_layer`)."""
    def work(l):
        cfg = choices[l.name]
        if given.get(l.name) is not None:
            return given[l.name], emodel.measure(source, l, cfg, given[l.name])
        fac = emodel.factors(source, l, cfg)
        known = emodel.known_error(l, cfg)  # the curve itself, where it is the factors' real error
        return fac, known if known is not None else emodel.measure(source, l, cfg, fac)

    got = per_layer(work, layers, lambda l: l.geometry.params)
    return ({l.name: g[0] for l, g in zip(layers, got)}, {l.name: g[1] for l, g in zip(layers, got)})


def measure(run: Run, model, table, choices: dict, original=None) -> LatencyMeasurement:
    """The whole original (or ``original``, the same model as a file) and ``model`` timed side by side
    with the table's settings, by the run's measurer."""
    with run.stage("latency"):
        return run.measurer.speedup(run.original if original is None else original, model, table, run.info,
                                    choices)


def check(run: Run, choice: Choice, built: Built, table=None) -> Attempt:
    """Check the rewritten model, count it, time it against the original where the budget is latency,
    validate it (outputs compared, latency interleaved) and write its report."""
    opts = run.opts
    run.source.graph = None  # the numpy weights are no longer needed: free them before onnxruntime loads
    if run.large:
        trim_memory()
    with temp_dir("onnx-alds-") as tmp:
        orig_ref, new_ref = _refs(run, built.model, Path(tmp))
        low_memory = isinstance(new_ref, Path)  # over 2 GB: one session at a time
        with run.stage("check"):
            if isinstance(new_ref, Path):
                check_model_file(new_ref, "the rewritten model")
            else:
                check_rewritten(run.original, built.model)
        latency = None
        if choice.budget.get("metric") == "latency" and table is not None and opts.budget.plan is None:
            latency = measure(run, new_ref, table, choice.choices, orig_ref)
            choice.budget.update(latency.to_budget())
        report = _report(run, choice, built)
        validation = None
        if opts.validation.validate:
            with run.stage("validate"):
                orig_file, new_file = _validation_refs(run, built.model, Path(tmp), orig_ref, new_ref)
                validation = validate(orig_file, new_file, provider=opts.validation.provider,
                                      input_shapes=run.info.input_shapes, feeds=run.cal_data,
                                      low_memory=low_memory, int8=opts.latency.int8,
                                      int8_copies=run.int8_copies, output_kinds=opts.validation.output_kinds)
                if new_file is not new_ref:  # validation saw files: whether the graphs are the same is the protos'
                    validation.same_graph = same_graph(run.original, built.model)
            report.validation = validation.to_dict()
    return Attempt(choice, built, report, validation, latency)


def _refs(run: Run, new: onnx.ModelProto, tmp: Path):
    """The models as onnxruntime and the checker take them: over 2 GB only as files with external data."""
    if not (run.large or proto_size(new) > EXTERNAL_DATA_THRESHOLD):
        return run.original, new
    orig_ref = Path(run.source.path) if run.source.path is not None else tmp / "original.onnx"
    if run.source.path is None:
        save_model(run.original, orig_ref, external_data=True)
    new_ref = tmp / "rewritten.onnx"
    save_model(new, new_ref, external_data=True)
    return orig_ref, new_ref


def _validation_refs(run: Run, new: onnx.ModelProto, tmp: Path, orig_ref, new_ref):
    """The models validation loads, as files where that holds fewer copies of the weights: a
    session made from a ModelProto serializes it first (a copy of all its weights beside the
    protobuf and onnxruntime's own), one made from a file does not.  So the input model is given
    as its file (read unchanged) and the rewrite is written to ``tmp``; not for int8 validation
    (its quantized copies are cached by the ModelProto's content) nor where the input is no file."""
    if isinstance(new_ref, Path) or run.opts.latency.int8 or run.source.path is None:
        return orig_ref, new_ref
    if not isinstance(orig_ref, Path):
        orig_ref = Path(run.source.path)
    new_ref = tmp / "rewritten.onnx"
    save_model(new, new_ref)
    return orig_ref, new_ref


def _report(run: Run, choice: Choice, built: Built) -> Report:
    info = run.info
    with run.stage("count"):
        flops_after = model_flops(built.model, info.input_shapes) if info.flops_total is not None else None
    report = build_report(info, choice.choices, built.measured, method=choice.method, budget=choice.budget,
                          error_model=run.emodel, params_after=count_params(built.model), flops_after=flops_after,
                          in_path=run.source.path, timings=run.timings, baselines=choice.baselines)
    report.plan = choice.plan
    if run.opts.validation.validate:
        report.budget["validation_inputs"] = run.cal_split
    gone = dropped(run.original)
    if gone:
        report.budget.setdefault("warnings", []).extend(f"dropped {d}" for d in gone)
        report.budget["dropped"] = gone
    return report


def finish(run: Run, attempt: Attempt) -> tuple[onnx.ModelProto, Report]:
    """Gate the kept attempt (``--max-output-error``, ``--min-speedup``: :class:`ValidationFailed`, nothing
    written) and return its model and report, with the gate's warnings."""
    v, opts = attempt.validation, run.opts.validation
    if v is not None:
        int8_speedup = attempt.latency.speedup if run.opts.latency.int8 and attempt.latency is not None else None
        attempt.report.budget.setdefault("warnings", []).extend(
            gate(v, max_output_error=opts.max_output_error, min_speedup=opts.min_speedup,
                 unchanged=attempt.choice.unchanged, speedup=int8_speedup))
    if run.metric is not None:
        _metric_gate(run, attempt)
    return attempt.model, attempt.report


def _metric_gate(run: Run, attempt: Attempt) -> None:
    """The kept attempt's task metric in the report; past the drop allowed, exit 5 (nothing written)
    where the drop was bounded (``--max-metric-drop``, or the default budget that searched by it), a
    warning otherwise."""
    m = run.metric
    same = attempt.choice.unchanged or (attempt.validation is not None and attempt.validation.same_graph)
    value = m.original if same else run.score(attempt.built)
    attempt.report.validation = dict(attempt.report.validation or {}, metric=m.to_dict(value))
    if m.ok(value):
        return
    said = f"{m.describe(value)}, past the {m.allowed_drop:.3g} allowed)"
    if m.max_drop is not None or run.opts.budget.default:
        raise ValidationFailed(f"{said}; nothing was written")
    attempt.report.budget.setdefault("warnings", []).append(f"{said}; bound it with --max-metric-drop")


__all__ = ["Run", "prepare", "analyze", "calibrate", "speed_guard", "options_for", "select", "plan_from_selection",
           "choices_from_plan", "choose", "unchanged", "build", "check", "measure", "finish", "use_sequential",
           "sequential_affordable", "timed", "Measurer"]
