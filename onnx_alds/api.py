"""The public API: wires the stages load → extract → spectra → select →
factorize/emit → check → validate → report."""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .cost import factorized_flops, factorized_params, full_rank
from .emit import apply_replacements, names_read_inside, replacement, restore_subgraphs, subgraph_bodies
from .errors import UsageError
from .extract import ModelInfo, count_params, extract, infer_shapes, _node_flops
from .folding import SCHEMES, canonical_scheme
from .io import (EXTERNAL_DATA_THRESHOLD, check_model, check_model_file, load_model, proto_size,
                 save_model, trim_memory)
from .plan import LayerPlan, Plan
from .report import LayerReport, Report
from .select import METHODS, Config, Selection, layer_options
from .spectra import candidate_ks, compute_spectra

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - t0, 4)


def _as_model(model_or_path) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    return load_model(model_or_path), str(model_or_path)


def analyze(model_or_path, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, gs.Graph, ModelInfo]:
    model, _ = _as_model(model_or_path)
    graph = gs.import_onnx(model)
    return model, graph, extract(model, graph, input_shapes)


def _budget(keep_params, keep_flops, keep_latency) -> tuple[str, float]:
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


def layer_configs(info: ModelInfo, schemes=None, k_max=None) -> dict[str, list[tuple[int, str]]]:
    schemes = tuple(schemes or SCHEMES)
    for s in schemes:
        if s not in SCHEMES:
            raise UsageError(f"unknown scheme {s!r} (use s0, s1, s2, s3)")
    out = {}
    for l in info.candidates:
        ss = sorted({canonical_scheme(s, l.geometry.kernel) for s in schemes})
        ks = candidate_ks(l.geometry.c, k_max, l.allow_groups)
        out[l.name] = [(k, s) for k in ks for s in ss]
    return out


def select(info: ModelInfo, *, metric: str, fraction: float, method: str = "alds", schemes=None,
           k_max=None, spectra=None, latency_table=None, compare: bool = True, progress: bool = True,
           timings: dict | None = None, cache_dir=None) -> tuple[Selection, dict]:
    """Run the selector on an analysed model; returns the selection and the
    max error the other methods reach at the same budget."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (use {', '.join(METHODS)})")
    timings = {} if timings is None else timings
    cands = info.candidates
    if metric == "flops":
        missing = [l.name for l in cands if l.geometry.flops is None]
        if missing or info.flops_total is None:
            raise UsageError("FLOPs are unknown for this model's dynamic sizes; give them with "
                             "--input-shape NAME:D1,D2,...")
    if metric == "latency" and latency_table is None:
        raise UsageError("a latency budget needs a latency table")
    weights = {l.name: l.weight4() for l in cands}
    if metric == "latency":  # only what the table measured
        configs = {l.name: [c for c in latency_table.configs(l.name)
                            if method != "uniform" or c == (1, "s0")] for l in cands}
    elif method == "uniform":
        configs = {l.name: [(1, "s0")] for l in cands}
    elif method == "alds-paper" and schemes is None:
        configs = layer_configs(info, ("s0",), k_max)  # the paper's ALDS folds with s0 only
    else:
        configs = layer_configs(info, schemes, k_max)
    if spectra is None:
        with _timed(timings, "spectra"):
            spectra = compute_spectra(weights, configs, progress=progress, cache_dir=cache_dir)
    with _timed(timings, "select"):
        options = []
        for l in cands:
            lat = latency_table.cost_fn(l) if metric == "latency" else None
            options.append(layer_options(l.name, l.geometry, spectra[l.name], metric, lat, configs[l.name]))
        if metric == "params":
            total = float(info.params_total)
        elif metric == "flops":
            total = float(info.flops_total)
        else:
            total = float(latency_table.model_total(info))
        layers_cost = sum(o.orig_cost for o in options)
        fixed = total - layers_cost
        budget = fraction * total - fixed
        sel = METHODS[method](options, budget, fixed=fixed, total=total)
    sel.details.update(metric=metric, fraction=fraction, total=total, fixed=fixed, target=fraction * total,
                       predicted=fixed + sel.cost)
    if metric == "latency":
        sel.details["predicted_ms"] = latency_table.predicted_ms(sel.choices)
    baselines = {}
    if compare:
        with _timed(timings, "compare"):
            for other in METHODS:
                if other == method:
                    continue
                opts = options
                if other == "uniform":
                    opts = [o.subset((o.k == 1) & (o.scheme == 0)) for o in options]
                elif other == "alds-paper":
                    opts = [o.subset(o.scheme == 0) for o in options]
                try:
                    baselines[other] = METHODS[other](opts, budget, fixed=fixed, total=total).max_rel_error
                except Exception as e:  # a baseline that cannot meet the budget is reported as such
                    log.info("baseline %s: %s", other, e)
                    baselines[other] = None
    return sel, baselines


def plan_from_selection(sel: Selection, info: ModelInfo) -> Plan:
    layers = []
    for l in info.candidates:
        c = sel.choices.get(l.name)
        if c is not None:
            layers.append(LayerPlan(l.name, l.weight_name, c.k, c.scheme, c.rank))
    budget = {k: sel.details[k] for k in ("metric", "fraction") if k in sel.details}
    budget["method"] = sel.method
    budget["max_rel_error"] = sel.max_rel_error
    return Plan(layers=layers, budget=budget)


def _resolve_plan(plan: Plan, info: ModelInfo) -> dict[str, Config]:
    """Check a plan against the model; returns layer name → Config with its error."""
    by_name = {l.name: l for l in info.layers}
    by_weight = {l.weight_name: l for l in info.layers}
    out = {}
    for e in plan.layers:
        l = by_name.get(e.name) or by_weight.get(e.weight)
        if l is None:
            raise UsageError(f"the plan names layer {e.name!r}, which is not in the model")
        if l.status != "candidate":
            raise UsageError(f"the plan factorizes {l.name!r}, which cannot be compressed ({l.reason})")
        g = l.geometry
        if g.c % e.k:
            raise UsageError(f"the plan's k={e.k} for {l.name!r} does not divide its {g.c} input channels")
        if e.k > 1 and not l.allow_groups:
            raise UsageError(f"{l.name!r} has an activation of unknown rank, so only k=1 can be emitted")
        if e.scheme not in l.schemes:
            raise UsageError(f"scheme {e.scheme} does not apply to {l.name!r} (kernel {g.kernel}); "
                             f"use one of {', '.join(l.schemes)}")
        r = full_rank(g, e.k, e.scheme)
        if e.rank > r:
            raise UsageError(f"the plan's rank {e.rank} for {l.name!r} exceeds the full rank {r} "
                             f"of k={e.k}, {e.scheme}")
        spectra = compute_spectra({l.name: l.weight4()}, {l.name: [(e.k, e.scheme)]}, workers=1, progress=False)
        err = float(spectra[l.name].error_curve(e.k, e.scheme)[e.rank])
        out[l.name] = Config(e.k, e.scheme, e.rank, err)
    return out


def emit(model: onnx.ModelProto, graph: gs.Graph, info: ModelInfo, choices: dict[str, Config | None],
         progress: bool = False) -> onnx.ModelProto:
    """Replace the chosen layers and export, keeping opset, IR version and metadata."""
    from tqdm.auto import tqdm

    replaced = {}
    chosen = [l for l in info.candidates if choices.get(l.name) is not None]
    for l in tqdm(chosen, desc="factorize", unit="layer", disable=not progress, leave=False):
        c = choices.get(l.name)
        if c is not None:
            replaced[id(l.node)] = replacement(l, c.k, c.scheme, c.rank)
            # the original weight leaves the graph (it has no other reader): free it now, so
            # that the factors of later layers do not pile up on top of every original
            if isinstance(l.node.inputs[1], gs.Constant):
                l.node.inputs[1].values = np.zeros((0,), np.float32)
            l._weight = None
    apply_replacements(graph, replaced)
    new = gs.export_onnx(graph, do_type_check=False)
    restore_subgraphs(model, new)
    _copy_model_fields(model, new)
    if not new.functions and model.functions:
        new.functions.extend(model.functions)
    return new


def _copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """IR version, opsets, producer and metadata of ``src`` onto ``dst``."""
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, f, getattr(src, f))
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)


def _check_rewritten(original: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """Full check (with strict shape inference) of the rewritten model; where
    the original itself does not pass the full check, the plain check."""
    from .errors import ModelError

    try:
        check_model(new, "the rewritten model", full=True)
    except ModelError:
        try:
            check_model(original, "the input model", full=True)
        except ModelError:
            check_model(new, "the rewritten model", full=False)
            return
        raise


def model_flops(model: onnx.ModelProto, input_shapes: dict[str, list]) -> int | None:
    shapes = infer_shapes(model, input_shapes)
    graph = gs.import_onnx(model)
    total = 0
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul"):
            nf = _node_flops(node, shapes)
            if nf is None:
                return None
            total += nf
    return total


def _report(info, choices, sel_method, budget, new_model, in_path, timings, baselines) -> Report:
    layers = []
    for l in info.layers:
        lr = LayerReport(name=l.name, op=l.op, weight=l.weight_name, weight_shape=list(l.weight_shape),
                         status="skipped" if l.status == "skipped" else "kept", reason=l.reason,
                         params_before=l.params + l.bias_params, params_after=l.params + l.bias_params,
                         flops_before=l.flops, flops_after=l.flops)
        c = choices.get(l.name) if l.status == "candidate" else None
        if c is not None:
            lr.status, lr.k, lr.scheme, lr.rank, lr.rel_error = "decomposed", c.k, c.scheme, c.rank, c.rel_error
            lr.params_after = factorized_params(l.geometry, c.k, c.scheme, c.rank) + l.bias_params
            lr.flops_after = factorized_flops(l.geometry, c.k, c.scheme, c.rank)
        elif l.status == "candidate":
            lr.reason = "kept: no factorization within the error threshold is cheaper"
        layers.append(lr)
    with _timed(timings, "count"):
        flops_after = model_flops(new_model, info.input_shapes) if info.flops_total is not None else None
    return Report(
        input=in_path, output=None, method=sel_method, budget=budget,
        params_before=info.params_total, params_after=count_params(new_model),
        flops_before=info.flops_total, flops_after=flops_after,
        max_rel_error=max((l.rel_error for l in layers), default=0.0),
        layers=layers, baselines=baselines, timings_s=timings, input_shapes=info.input_shapes,
    )


def rewrite(model_or_path, keep_params=None, keep_flops=None, keep_latency=None, method: str = "alds", *,
            plan: Plan | str | Path | None = None, schemes=None, k_max: int | None = None,
            input_shapes: dict | None = None, provider: str = "auto", validate: bool = True,
            compare: bool = True, latency_table=None, progress: bool = False, cache_dir=None,
            ) -> tuple[onnx.ModelProto, Report]:
    """Compress a model; returns the rewritten model and its report.

    With ``plan`` the given plan is applied as is; otherwise ``method`` selects
    under the budget (``keep_params`` by default 0.5)."""
    timings: dict = {}
    with _timed(timings, "load"):
        model, in_path = _as_model(model_or_path)
    with _timed(timings, "extract"):
        graph = gs.import_onnx(model)
        info = extract(model, graph, input_shapes)
    large = proto_size(model) > EXTERNAL_DATA_THRESHOLD
    if large and in_path is not None:
        model = _detach_weights(model, graph)
        trim_memory()
    baselines = {}
    if plan is not None:
        if not isinstance(plan, Plan):
            plan = Plan.load(plan)
        choices = _resolve_plan(plan, info)
        budget = dict(plan.budget, applied_plan=True)
        sel_method = plan.budget.get("method", "plan")
    else:
        metric, fraction = _budget(keep_params, keep_flops, keep_latency)
        if metric == "latency" and latency_table is None:
            from .latency import LatencyTable  # measured per provider, cached

            latency_table = LatencyTable.for_model(model, info, provider=provider, k_max=k_max or 16,
                                                   schemes=schemes, progress=progress)
        if not info.candidates and fraction < 1.0:
            from .errors import InfeasibleBudget

            raise InfeasibleBudget("the model has no compressible layer, so the smallest reachable "
                                   "fraction is 1.0", 1.0)
        sel, baselines = select(info, metric=metric, fraction=fraction, method=method, schemes=schemes,
                                k_max=k_max, latency_table=latency_table, compare=compare,
                                progress=progress, timings=timings, cache_dir=cache_dir)
        choices = sel.choices
        sel_method = method
        budget = {"metric": metric, "fraction": fraction, "target": sel.details["target"],
                  "predicted": sel.details["predicted"], "total_before": sel.details["total"]}
        if metric == "latency":
            budget.update(provider=latency_table.provider, model_ms=latency_table.model_ms,
                          predicted_ms=sel.details["predicted_ms"],
                          predicted_speedup=latency_table.model_ms / sel.details["predicted_ms"],
                          measurements=latency_table.measured, cached=latency_table.cached)
        plan = plan_from_selection(sel, info)
    with _timed(timings, "emit"):
        new = emit(model, graph, info, choices, progress=progress)
    del graph
    for l in info.layers:  # the numpy weights are no longer needed: free them before onnxruntime loads
        l._weight, l.node = None, None
    if large:
        trim_memory()
    with tempfile.TemporaryDirectory(prefix="onnx-alds-") as tmp:
        # onnxruntime and the checker take models over 2 GB only as files with external data
        orig_ref, new_ref = model, new
        if large or proto_size(new) > EXTERNAL_DATA_THRESHOLD:
            if in_path is None:
                orig_ref = Path(tmp) / "original.onnx"
                save_model(model, orig_ref, external_data=True)
            else:
                orig_ref = Path(in_path)
            new_ref = Path(tmp) / "rewritten.onnx"
            save_model(new, new_ref, external_data=True)
        with _timed(timings, "check"):
            if isinstance(new_ref, Path):
                check_model_file(new_ref, "the rewritten model")
            else:
                _check_rewritten(model, new)
        if budget.get("metric") == "latency":
            with _timed(timings, "latency"):
                budget.update(_measure_latency(orig_ref, new_ref, latency_table, info))
        report = _report(info, choices, sel_method, budget, new, in_path, timings, baselines)
        report.plan = plan
        if validate:
            from .validate import validate as run_validation

            with _timed(timings, "validate"):
                v = run_validation(orig_ref, new_ref, provider=provider, input_shapes=info.input_shapes,
                                   low_memory=isinstance(new_ref, Path))
            report.validation = v.to_dict()
    return new, report


def _detach_weights(model: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
    """For a large model we loaded ourselves: load every constant of the graph
    into numpy and return a weightless shell of the model (IR version, opsets,
    metadata), so that the protobuf that held the original bytes is freed.
    Peak memory then stays near two copies of the weights, not three."""
    for g in [graph] + [sg for n in graph.nodes for sg in n.subgraphs(recursive=True)]:
        for t in list(g.tensors().values()) + [v for n in g.nodes for v in n.attrs.values()]:
            if isinstance(t, gs.Constant):
                t.values  # noqa: B018 - loads LazyValues, dropping the reference to the protobuf
    shell = onnx.ModelProto()
    _copy_model_fields(model, shell)
    shell.functions.extend(model.functions)
    # If/Loop/Scan bodies and the outer weights they read, for emit's restore_subgraphs
    bodies = subgraph_bodies(model.graph)
    shell.graph.node.extend(bodies)
    read = names_read_inside(bodies)
    shell.graph.initializer.extend(t for t in model.graph.initializer if t.name in read)
    # graphsurgeon keeps the model's opset list, a view that would keep the whole protobuf alive
    graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains]
    return shell


def _measure_latency(model, new, table, info) -> dict:
    """Whole-model latency before and after, interleaved, with the table's settings."""
    from .runtime import providers_for, session
    from .validate import interleaved_latency, random_inputs

    providers = providers_for("cuda" if table.provider == "CUDAExecutionProvider" else "cpu")
    s0, s1 = session(model, providers, table.threads), session(new, providers, table.threads)
    feeds = random_inputs(s0, info.input_shapes, batch=1)
    t0, t1 = interleaved_latency([s0, s1], [feeds, feeds], warmup=5, repeats=30)
    before, after = float(np.median(t0)), float(np.median(t1))
    return {"threads": table.threads, "measured_ms_before": before, "measured_ms": after,
            "measured_speedup": before / after if after > 0 else float("nan")}


def apply_plan(model_or_path, plan, *, input_shapes: dict | None = None) -> onnx.ModelProto:
    """Apply a plan (a :class:`Plan`, its dict or a JSON path) without selection."""
    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    new, _ = rewrite(model_or_path, plan=plan, input_shapes=input_shapes, validate=False, compare=False)
    return new


def inspect(model_or_path, input_shapes: dict | None = None) -> ModelInfo:
    _, _, info = analyze(model_or_path, input_shapes)
    return info
