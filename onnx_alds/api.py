"""The public API: prepare → the budget's policy → finish.  It wires; it does no stage work.

    prepare (load, extract, calibrate, error model)            pipeline/stages.py
      → a parameter or FLOP budget, or a plan as given          policy/guarded.py
      → a latency budget: the closed loop (+ second route)      policy/latency_loop.py, policy/second_route.py
      → a latency budget with an output-error bound: a search   policy/error_search.py
      → no budget: the smallest plan within the tolerance       policy/error_bounded.py
    → finish (gates: --max-output-error, --min-speedup)          pipeline/stages.py
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .errors import ValidationFailed
from .extract import ModelInfo
from .options import RewriteOptions, budget_of
from .pipeline.stages import analyze, calibrate, finish, prepare, select, speed_guard
from .plan import Plan
from .policy.error_bounded import run_error_bounded
from .policy.error_search import fastest_within
from .policy.guarded import run_guarded
from .policy.latency_loop import run_latency
from .report import Report
from .select import layer_configs


def inspect(model_or_path, input_shapes: dict | None = None) -> ModelInfo:
    return analyze(model_or_path, input_shapes)[2]


def rewrite(model_or_path, keep_params=None, keep_flops=None, keep_latency=None, method: str = "alds", *,
            options: RewriteOptions | None = None, **kwargs) -> tuple[onnx.ModelProto, Report]:
    """Compress a model; returns the rewritten model and its report.

    ``options`` (a :class:`~onnx_alds.options.RewriteOptions`) says everything at once; otherwise the
    keywords build it (:meth:`RewriteOptions.from_kwargs`, which lists them: ``plan``, ``schemes``,
    ``k_max``, ``input_shapes``, ``provider``, ``validate``, ``calibration``, ``error``,
    ``max_output_error``, ``min_speedup``, ``objective``, ``int8``, ...).

    With ``plan`` the given plan is applied as is; otherwise ``method`` selects under the budget
    (:mod:`onnx_alds.policy.guarded`; never slower than the input) or, with no budget, searches the
    smallest plan whose outputs stay within a tolerance (:mod:`onnx_alds.policy.error_bounded`),
    with the error model ``error`` (default ``data`` when ``calibration`` is given, else
    ``spectral``).  ``keep_latency`` runs the measured closed loop
    (:mod:`onnx_alds.policy.latency_loop`), and with ``max_output_error`` the search for the fastest
    rewrite within that error (:mod:`onnx_alds.policy.error_search`).  ``objective`` is what ``alds``
    minimises: ``"max"`` (the paper's), ``"sum"``, or ``"best"`` (candidates measured on the
    calibration data: :mod:`onnx_alds.pipeline.candidates`).  Past ``max_output_error`` or below
    ``min_speedup`` the rewrite raises :class:`ValidationFailed` and nothing is written."""
    if options is None:
        options = RewriteOptions.from_kwargs(keep_params, keep_flops, keep_latency, method, **kwargs)
    elif kwargs or any(v is not None for v in (keep_params, keep_flops, keep_latency)):
        raise TypeError("rewrite takes either options or keyword arguments, not both")
    run = prepare(model_or_path, options)
    if options.budget.latency and options.validation.max_output_error is not None:
        attempt = fastest_within(run)
    elif options.budget.latency:
        attempt = run_latency(run)
    elif options.budget.default:
        attempt = run_error_bounded(run)
    else:
        attempt = run_guarded(run)
    return finish(run, attempt)


def apply_plan(model_or_path, plan, *, input_shapes: dict | None = None) -> onnx.ModelProto:
    """Apply a plan (a :class:`Plan`, its dict or a JSON path) without selection."""
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    new, _ = rewrite(model_or_path, plan=plan, input_shapes=input_shapes, validate=False, compare=False)
    return new


__all__ = ["rewrite", "apply_plan", "inspect", "analyze", "select", "calibrate", "speed_guard", "budget_of",
           "layer_configs", "RewriteOptions", "ValidationFailed"]
