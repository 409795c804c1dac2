"""RewriteOptions: every setting of a rewrite, built once (by the CLI or from the keyword API),
checked once, and passed whole; nothing forwards options by hand.

The settings fall in five groups, one frozen dataclass each: the budget (what is kept, or the plan
to apply), the selection (method, schemes, k, objective), the calibration (data, error model,
factors), the validation (provider, gates, output kinds) and the latency settings (a measured
table, the closed loop's rounds, int8).  A policy that tries another budget derives new options
(:meth:`RewriteOptions.with_budget`) and never edits these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .compare import OUTPUT_KINDS
from .errors import UsageError
from .plan import Plan

DEFAULT_FRACTION = 0.5  # the default budget: keep-params 0.5, ...
DEFAULT_RELAXED = (0.75, 0.9)  # ... then these where 0.5 is slower, then no layer decomposed
METHODS = ("alds", "alds-paper", "uniform")
OBJECTIVES = (None, "max", "sum", "best")


def budget_of(keep_params, keep_flops, keep_latency) -> tuple[str, float]:
    """The budget's metric and kept fraction (keep-params 0.5 when none is given)."""
    given = [(m, v) for m, v in (("params", keep_params), ("flops", keep_flops), ("latency", keep_latency))
             if v is not None]
    if len(given) > 1:
        raise UsageError("give only one of keep_params, keep_flops and keep_latency")
    metric, frac = given[0] if given else ("params", DEFAULT_FRACTION)
    try:
        frac = float(frac)
    except (TypeError, ValueError):
        raise UsageError(f"the kept fraction {frac!r} is not a number") from None
    if not (0.0 < frac <= 1.0) or math.isnan(frac):
        raise UsageError(f"the kept fraction must be in (0, 1], got {frac}")
    return metric, frac


def _bound(value, what: str, low: float = 0.0):
    """A gate's bound: None, or a finite number of at least ``low``."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < low:
        raise UsageError(f"{what} must be a finite number of at least {low:g}, got {value!r}")
    return v


@dataclass(frozen=True)
class BudgetOptions:
    """What is kept (at most one of the three fractions), or the plan to apply as given."""

    keep_params: float | None = None
    keep_flops: float | None = None
    keep_latency: float | None = None
    plan: Plan | None = None

    @property
    def default(self) -> bool:
        """No budget and no plan given: keep-params 0.5, relaxed where it is slower."""
        return self.plan is None and self.keep_params is None and self.keep_flops is None \
            and self.keep_latency is None

    @property
    def metric(self) -> str:
        return budget_of(self.keep_params, self.keep_flops, self.keep_latency)[0]

    @property
    def fraction(self) -> float:
        return budget_of(self.keep_params, self.keep_flops, self.keep_latency)[1]

    @property
    def latency(self) -> bool:
        """A latency budget to select for (not a plan applied as given)."""
        return self.plan is None and self.keep_latency is not None


@dataclass(frozen=True)
class SelectionOptions:
    method: str = "alds"
    schemes: tuple[str, ...] | None = None
    k_max: int | None = None
    objective: str | None = None  # None: "best" where calibration data can judge candidates, else "max"
    fill_budget: bool = True
    compare: bool = True  # the baselines' objective at the same budget, in the report
    allow_slower: bool = False  # no speed guard


@dataclass(frozen=True)
class CalibrationOptions:
    data: object = None  # name → array dict, an .npz path or an iterable of feed dicts
    error: str | None = None  # the error model; None: "data" with calibration data, else "spectral"
    bias_correction: bool = True
    sequential: bool | None = None  # None: while it is cheap (see pipeline.stages.use_sequential)
    hold_out: bool = True  # judge what is fitted on calibration arrays on a held-back quarter of them
    sensitivity: bool = False  # weigh each layer's error by how much of it reaches the outputs (sensitivity.py)


@dataclass(frozen=True)
class ValidationOptions:
    validate: bool = True
    provider: str = "auto"
    max_output_error: float | None = None
    min_speedup: float | None = None
    max_speed_retries: int = 2
    output_kinds: dict | None = field(default=None, hash=False)  # output name → scores | embedding | map
    metric: object = field(default=None, hash=False, compare=False)  # FILE.py[:FUNC] or fn(model_path) -> float
    max_metric_drop: float | None = None  # in the metric's units (None: 1 % of the original's score)


@dataclass(frozen=True)
class LatencyOptions:
    table: object = field(default=None, hash=False, compare=False)  # a measured LatencyTable to use
    max_rounds: int = 3  # of the --keep-latency closed loop
    int8: bool = False  # time the int8 QDQ copies of both models
    best_effort: bool = False  # write a --keep-latency rewrite measured far short of its target


@dataclass(frozen=True)
class RewriteOptions:
    budget: BudgetOptions = BudgetOptions()
    selection: SelectionOptions = SelectionOptions()
    calibration: CalibrationOptions = CalibrationOptions()
    validation: ValidationOptions = ValidationOptions()
    latency: LatencyOptions = LatencyOptions()
    input_shapes: dict | None = field(default=None, hash=False)
    progress: bool = False
    cache_dir: object = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every rule between settings, once (:class:`UsageError` with one sentence)."""
        b, s, v, lat = self.budget, self.selection, self.validation, self.latency
        if b.plan is None:
            budget_of(b.keep_params, b.keep_flops, b.keep_latency)
        if s.method not in METHODS:
            raise UsageError(f"unknown method {s.method!r} (use {', '.join(METHODS)})")
        if s.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {s.objective!r} (use max, sum or best)")
        if s.k_max is not None and s.k_max < 1:
            raise UsageError("--k-max must be at least 1")
        _bound(v.max_output_error, "--max-output-error")
        _bound(v.min_speedup, "--min-speedup")
        _bound(v.max_metric_drop, "--max-metric-drop")
        if v.max_metric_drop is not None and v.metric is None:
            raise UsageError("--max-metric-drop bounds the drop of the task metric: give the metric with --metric-script")
        if v.metric is not None and not v.validate:
            raise UsageError("--metric-script judges the rewrite, which --no-validate skips; drop --no-validate")
        if lat.int8 and not v.validate and not b.latency:
            raise UsageError("--int8 times the int8 models in validation (and for --keep-latency); with "
                             "--no-validate there is nothing for it to time")
        if not v.validate and (v.max_output_error is not None or v.min_speedup is not None):
            raise UsageError("--max-output-error and --min-speedup need validation (drop --no-validate)")
        bad = sorted(set((v.output_kinds or {}).values()) - set(OUTPUT_KINDS))
        if bad:
            raise UsageError(f"unknown output kind {bad[0]!r} (use {', '.join(OUTPUT_KINDS)})")
        if v.output_kinds and not v.validate and self.calibration.data is None:
            raise UsageError("--output-kind says how outputs are judged, and with --no-validate and no --calibration "
                             "nothing judges them; drop --no-validate or --output-kind")
        self._check_calibration()

    def _check_calibration(self) -> None:
        """The settings of what is fitted on calibration data need the data: without it they would be
        ignored without a word."""
        c = self.calibration
        if c.data is not None:
            return
        needs = [flag for flag, given in (("--sequential" if c.sequential else "--no-sequential", c.sequential is not None),
                                          ("--no-hold-out", not c.hold_out),
                                          ("--no-bias-correction", not c.bias_correction)) if given]
        if needs:
            raise UsageError(f"{needs[0]} sets how calibration data is used (what is fitted and judged on it), and "
                             f"there is none: give --calibration or --data-loader-script, or leave {needs[0]} out")

    def with_budget(self, **changes) -> "RewriteOptions":
        """The same options with other budget settings (a policy trying another fraction)."""
        return replace(self, budget=replace(self.budget, **changes))

    @classmethod
    def from_kwargs(cls, keep_params=None, keep_flops=None, keep_latency=None, method: str = "alds", *,
                    plan=None, schemes=None, k_max=None, input_shapes=None, provider="auto", validate=True,
                    compare=True, latency_table=None, progress=False, cache_dir=None, error=None,
                    calibration=None, bias_correction=True, max_output_error=None, min_speedup=None,
                    allow_slower=False, max_speed_retries=2, sequential=None, max_latency_rounds=3,
                    fill_budget=True, objective=None, int8=False, best_effort=False,
                    output_kinds=None, hold_out=True, metric=None, max_metric_drop=None,
                    sensitivity=False) -> "RewriteOptions":
        """The keyword API (:func:`onnx_alds.rewrite`'s arguments, the CLI's flags) as options."""
        if plan is not None:
            plan = replace(plan) if isinstance(plan, Plan) else Plan.from_dict(plan) if isinstance(plan, dict) \
                else Plan.load(Path(plan))  # a copy: the caller's plan is never edited
        return cls(
            budget=BudgetOptions(keep_params, keep_flops, keep_latency, plan),
            selection=SelectionOptions(method, tuple(schemes) if schemes else None, k_max, objective,
                                       fill_budget, compare, allow_slower),
            calibration=CalibrationOptions(calibration, error, bias_correction, sequential, hold_out, bool(sensitivity)),
            validation=ValidationOptions(validate, provider, max_output_error, min_speedup, max_speed_retries,
                                         dict(output_kinds) if output_kinds else None, metric, max_metric_drop),
            latency=LatencyOptions(latency_table, max_latency_rounds, int8, best_effort),
            input_shapes=input_shapes, progress=progress, cache_dir=cache_dir)


def objective_for(opts: RewriteOptions, error_model: str, has_data: bool, large: bool) -> str:
    """The objective a selection uses: the one given, or (``None``) ``"best"`` (measured candidates)
    where the calibration data can judge them (alds with data-aware errors under a parameter or FLOP
    budget, on a model under 2 GB), ``"max"`` otherwise."""
    objective, method = opts.selection.objective, opts.selection.method
    if objective not in (None, "best"):
        return objective
    measurable = method == "alds" and error_model == "data" and has_data and opts.budget.keep_latency is None \
        and not large
    if objective == "best" and not measurable:
        raise UsageError("objective 'best' measures candidate plans on the calibration data: it needs "
                         "--calibration with the data error model, --method alds and a parameter or FLOP budget")
    return "best" if measurable else "max"
