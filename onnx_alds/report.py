"""The rewrite report (JSON) and its plots."""

from __future__ import annotations

import math

import json
from dataclasses import asdict, dataclass, field

from .io import atomic_write_bytes


def _candidate(method: str, objective: str, schemes=None) -> str:
    """A candidate plan as the summary names it: ``min-max``, ``uniform``, ``min-sum (s0 only)``."""
    base = "uniform" if method == "uniform" else f"min-{objective}"
    return f"{base} ({'+'.join(schemes)} only)" if schemes else base


@dataclass
class LayerReport:
    name: str
    op: str
    weight: str
    weight_shape: list
    status: str  # decomposed | kept | skipped
    reason: str | None = None
    k: int | None = None
    scheme: str | None = None
    rank: int | None = None
    rel_error: float = 0.0  # predicted by the error model
    measured_error: float | None = None  # of the emitted factors (see Report.error_model)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None


@dataclass
class Report:
    input: str | None
    output: str | None
    method: str
    budget: dict
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    max_rel_error: float
    error_model: str = "spectral"
    error_bound: str = "upper"  # how predicted relates to measured: exact | upper | lower
    max_measured_error: float | None = None
    layers: list[LayerReport] = field(default_factory=list)
    validation: dict | None = None
    baselines: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    input_shapes: dict = field(default_factory=dict)
    plan: object = field(default=None, repr=False)  # the Plan that was applied

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def flops_fraction(self) -> float | None:
        if not self.flops_before or self.flops_after is None:
            return None
        return self.flops_after / self.flops_before

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("plan", None)
        d["params_fraction"] = self.params_fraction
        d["flops_fraction"] = self.flops_fraction
        return d

    @property
    def speedup(self) -> float | None:
        v = self.validation or {}
        if not v.get("latency_ms_before") or not v.get("latency_ms_after"):
            return None
        return v["latency_ms_before"] / v["latency_ms_after"]

    @property
    def warnings(self) -> list[str]:
        return list(self.budget.get("warnings", []))

    def save(self, path) -> None:
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def summary(self) -> str:
        dec = sum(l.status == "decomposed" for l in self.layers)
        skip = sum(l.status == "skipped" for l in self.layers)
        lines = [
            f"method {self.method}: {dec} of {len(self.layers)} layers decomposed ({skip} not compressible)",
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_fraction:.3f})",
        ]
        if self.flops_fraction is not None:
            lines.append(f"FLOPs  {self.flops_before:,} -> {self.flops_after:,} ({self.flops_fraction:.3f})")
        what = {"paper": "the paper's surrogate (a lower bound)", "spectral": "operator norm, upper bound",
                "frobenius": "Frobenius norm", "data": "output error on the calibration data"}.get(
            self.error_model, self.error_model)
        line = f"max relative error {self.max_rel_error:.4f} (error model {self.error_model}: {what})"
        if self.max_measured_error is not None:
            line += f", measured {self.max_measured_error:.4f}"
        if self.budget.get("sequential"):
            line += " after sequential calibration"
        lines.append(line)
        measure = "max error"
        if self.budget.get("objective") == "sum" and self.budget.get("rss_error") is not None:
            measure = "root-sum-square error"
            lines.append(f"objective: least sum of squared layer errors; root-sum-square "
                         f"{self.budget['rss_error']:.4f}")
        if self.budget.get("objective") == "best" and self.budget.get("candidates"):
            tried = ", ".join(f"{_candidate(t['method'], t['objective'], t.get('schemes'))} {judged_figures(t)}"
                              for t in self.budget["candidates"])
            method, objective, *schemes = self.budget["picked"].split("/")
            kept = _candidate(method, objective, schemes[0].split("+") if schemes else None)
            on = self.budget.get("validation_inputs", "the calibration data")
            refit = self.budget.get("sequential_refit")
            if refit and refit["kept"] == "sequential":
                kept += f", refitted sequentially: {judged_figures(refit, 'sequential_')}"
            lines.append(f"candidate plans one-shot, output rel L2 on {on}: {tried}; kept {kept}")
        for name, err in self.baselines.items():
            what = f"{measure} {err:.4f}" if err is not None else "cannot meet the budget"
            lines.append(f"  {name:<10} at the same budget: {what}")
        b = self.budget
        if b.get("default"):
            lines.append(_default_line(b["default"]))
        if b.get("metric") == "latency" and b.get("measured_ms") is not None:
            predicted = (f"predicted speed-up {b['model_ms'] / b['predicted_ms']:.2f}x, "
                         if b.get("model_ms") and b.get("predicted_ms") and math.isfinite(b["predicted_ms"]) else "")
            if b.get("route"):
                predicted = f"the {b['route']} plan (the table's fell short), {predicted}"
            int8 = ", int8 models" if b.get("int8") else ""
            lines.append(f"latency on {b.get('provider', '?')} (batch 1, {b.get('threads', '?')} threads{int8}): "
                         f"{predicted}measured {b['measured_speedup']:.2f}x "
                         f"({b['measured_ms_before']:.3f} ms -> {b['measured_ms']:.3f} ms"
                         f"{', the ' + str(b['remeasured']) + ' of 2 measurements' if b.get('remeasured') else ''})"
                         f"{', round ' + str(b['rounds']) + ' of ' + str(b['rounds_tried']) if b.get('rounds_tried') else ''}")
            if b.get("in_context"):
                lines.append(f"  the table: {b['in_context']} layers timed inside the model by onnxruntime's profiler, "
                             f"{b.get('corrected', 0)} of them corrected by their factorization measured there")
        v = self.validation
        if v:
            lines.append(f"validation on {v['provider']}: max |diff| {v['max_abs_diff']:.3g}, "
                         f"rel L2 {v['rel_l2']:.3g}" + (f" on {b['validation_inputs']}" if b.get("validation_inputs") else ""))
            if v.get("latency_ms_before") is not None:
                lines.append(f"latency{' of the int8 copies' if v.get('int8') else ''} "
                             f"{v['latency_ms_before']:.3f} ms -> {v['latency_ms_after']:.3f} ms "
                             f"({v['latency_ms_before'] / max(v['latency_ms_after'], 1e-9):.2f}x)")
            if v.get("metric"):
                m = v["metric"]
                lines.append(f"metric ({m['script']}): {m['original']:.4g} -> {m['rewritten']:.4g}, a drop of "
                             f"{m['drop']:.3g} (at most {m['max_drop']:.3g})")
        return "\n".join(lines)


def judged_figures(figures: dict, prefix: str = "") -> str:
    """A judged build's figures (a candidate's, the refit's): rel L2, and what else it was judged by."""
    out = f"{figures[prefix + 'rel_l2']:.4f}"
    extra = [f"top-1 {100 * figures[prefix + 'top1_agreement']:.1f} %"] if prefix + "top1_agreement" in figures else []
    extra += [f"metric {figures[prefix + 'metric']:.4g}"] if prefix + "metric" in figures else []
    return out + (f" ({', '.join(extra)})" if extra else "")


def _default_line(d: dict) -> str:
    """The summary's line for the default budget's search (no budget given)."""
    if d.get("judged_on") == "no compressible layer":
        return "no budget given and no compressible layer: the model is written unchanged"
    within = []
    if d.get("metric"):
        within.append(f"task metric drops at most {d['max_metric_drop']:.3g}")
    if d.get("tolerance") is not None:
        scaled = ""
        if d.get("noise_reference"):
            n = d["noise_reference"]
            scaled = (f" ({n['factor']:g}x what {100 * n['input_noise']:g} % input noise moves "
                      f"{', '.join(sorted(d['output_tolerances']))})")
        within.append(f"outputs stay within relative L2 {d['tolerance']:.3g}{scaled} on {d['judged_on']}")
    if not within:
        return "no budget given and no calibration data: the model is written unchanged"
    return (f"no budget given: keep-params {d['kept']:.3g}, the smallest of {len(d['tried'])} tried whose "
            f"{' and whose '.join(within)}")


def _short(name: str, width: int = 28) -> str:
    """A layer name for an axis label: its end is what tells layers apart."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_notes(report: Report) -> list[str]:
    """The numbers the plot's text box shows: budget, baselines, validation."""
    lines = [f"params {report.params_fraction:.3f} of original"]
    if report.flops_fraction is not None:
        lines.append(f"FLOPs {report.flops_fraction:.3f} of original")
    lines.append(f"max ε ({report.method}) {report.max_rel_error:.3f}")
    rss = report.budget.get("objective") == "sum" and report.budget.get("rss_error") is not None
    if rss:
        lines.append(f"rss ε ({report.method}) {report.budget['rss_error']:.3f}")
    for name, err in report.baselines.items():
        lines.append(f"{'rss' if rss else 'max'} ε ({name}) "
                     + (f"{err:.3f}" if err is not None else "cannot meet the budget"))
    v = report.validation
    if v:
        lines.append(f"validation rel L2 {v['rel_l2']:.3g} on {str(v.get('provider', '?')).replace('ExecutionProvider', '')}")
        if v.get("latency_ms_before") and v.get("latency_ms_after"):
            lines.append(f"latency {v['latency_ms_before']:.3f} → {v['latency_ms_after']:.3f} ms")
    else:
        lines.append("not validated")
    return lines


def plot_report(report: Report, path) -> None:
    """Per-layer relative error and kept fraction of parameters, so a user sees
    where the budget went; a box beside the bars gives the totals, the
    baselines at the same budget and the validation error."""
    save_figure(report_figure(report), path)


def save_figure(fig, path) -> None:
    """Write a matplotlib figure to ``path`` atomically (the format from its suffix, default png), and
    close it."""
    import io as _io

    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format=str(path).rsplit(".", 1)[-1] if "." in str(path) else "png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def build_report(info, choices: dict, measured: dict, *, method: str, budget: dict, error_model,
                 params_after: int, flops_after, in_path, timings: dict, baselines: dict) -> Report:
    """The report of a rewrite: one row per layer (decomposed, kept or skipped,
    with its predicted and measured error and its cost before and after)."""
    from .cost import factorized_flops, factorized_params

    layers = []
    for l in info.layers:
        lr = LayerReport(name=l.name, op=l.op, weight=l.weight_name, weight_shape=list(l.weight_shape),
                         status="skipped" if l.status == "skipped" else "kept", reason=l.reason,
                         params_before=l.params + l.bias_params, params_after=l.params + l.bias_params,
                         flops_before=l.flops, flops_after=l.flops)
        c = choices.get(l.name) if l.status == "candidate" else None
        if c is not None:
            lr.status, lr.k, lr.scheme, lr.rank, lr.rel_error = "decomposed", c.k, c.scheme, c.rank, c.rel_error
            lr.measured_error = measured.get(l.name)
            lr.params_after = factorized_params(l.geometry, c.k, c.scheme, c.rank) + l.bias_params
            lr.flops_after = factorized_flops(l.geometry, c.k, c.scheme, c.rank)
        elif l.status == "candidate":
            lr.reason = "kept: no factorization within the error threshold is cheaper"
        layers.append(lr)
    meas = [l.measured_error for l in layers if l.measured_error is not None]
    return Report(
        input=in_path, output=None, method=method, budget=budget,
        params_before=info.params_total, params_after=params_after,
        flops_before=info.flops_total, flops_after=flops_after,
        max_rel_error=max((l.rel_error for l in layers), default=0.0),
        error_model=error_model.name, error_bound=error_model.bound,
        max_measured_error=max(meas) if meas else None,
        layers=layers, baselines=baselines, timings_s=timings, input_shapes=info.input_shapes,
    )


def report_figure(report: Report):
    """The figure of :func:`plot_report` (a matplotlib Figure, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = [l for l in report.layers if l.status != "skipped"]
    names = [_short(l.name) for l in layers]
    x = list(range(len(layers)))
    width = max(8.0, 0.32 * len(layers) + 2.0)
    search = (report.budget.get("default") or {}).get("tried") or []
    fig = plt.figure(figsize=(width + 2.8, 10.5 if search else 7.5))
    outer = fig.add_gridspec(2 if search else 1, 1, height_ratios=[2.6, 1] if search else [1])
    bars = outer[0].subgridspec(2, 1, hspace=0.08)
    a1 = fig.add_subplot(bars[0])
    a2 = fig.add_subplot(bars[1], sharex=a1)
    a1.tick_params(labelbottom=False)
    decomposed = [l.status == "decomposed" for l in layers]
    a1.bar(x, [l.rel_error for l in layers], color=["tab:red" if d else "tab:gray" for d in decomposed])
    a1.axhline(report.max_rel_error, color="k", lw=0.8, ls="--")
    a1.set_ylabel("relative error ε", fontsize=10)
    kept = [l.params_after / l.params_before if l.params_before else 1.0 for l in layers]
    a2.bar(x, kept, color=["tab:blue" if d else "tab:gray" for d in decomposed])
    for i, l in enumerate(layers):
        if l.status == "decomposed":
            a2.text(i, kept[i] + 0.02, f"k{l.k} {l.scheme} r{l.rank}", ha="center", va="bottom", fontsize=7,
                    rotation=90)
    a2.set_ylabel("params kept (layer)", fontsize=10)
    a2.set_ylim(0, 1.35)
    a2.set_xticks(x)
    a2.set_xticklabels(names, rotation=90, fontsize=8 if len(layers) <= 60 else 7)
    a2.set_xlim(-0.6, len(layers) - 0.4)
    # legends and the text box sit right of the axes, never over the bars
    handles = [Patch(color="tab:red", label="error (decomposed)"), Patch(color="tab:blue", label="kept fraction"),
               Patch(color="tab:gray", label="kept as is"),
               plt.Line2D([], [], color="k", lw=0.8, ls="--", label=f"max ε = {report.max_rel_error:.3f}")]
    a1.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    a2.text(1.01, 1.0, "\n".join(plot_notes(report)), transform=a2.transAxes, va="top", ha="left", fontsize=9,
            family="monospace", bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.7"))
    if search:
        _search_panel(fig.add_subplot(outer[1]), report.budget["default"])
    fig.suptitle(f"{report.method}: params {report.params_fraction:.3f} of original, "
                 f"max ε {report.max_rel_error:.3f}", fontsize=12)
    fig.tight_layout(rect=(0, 0, width / (width + 2.8), 1))
    return fig


def _search_panel(ax, d: dict) -> None:
    """The default budget's search (no budget given): each probe's output error, and with
    ``--metric-script`` its task metric, against the kept fraction of parameters; the tolerance
    and the fraction kept."""
    tried = sorted(d["tried"])
    fr = [t[0] for t in tried]
    ax.plot(fr, [t[1] for t in tried], "o-", color="tab:red", label="output rel L2")
    if d.get("tolerance") is not None:
        ax.axhline(d["tolerance"], color="tab:red", lw=0.8, ls="--", label=f"tolerance {d['tolerance']:g}")
    ax.axvline(d["kept"], color="k", lw=0.8, ls=":", label=f"kept {d['kept']:.3g}")
    ax.set_xlabel("keep-params (default budget search)", fontsize=10)
    ax.set_ylabel("output rel L2", fontsize=10, color="tab:red")
    handles, labels = ax.get_legend_handles_labels()
    if d.get("metric"):
        m = ax.twinx()
        m.plot(fr, [t[3] for t in tried], "s-", color="tab:blue", label="task metric")
        m.axhline(d["metric_original"] - d["max_metric_drop"], color="tab:blue", lw=0.8, ls="--",
                  label=f"metric floor {d['metric_original'] - d['max_metric_drop']:.4g}")
        m.set_ylabel("task metric", fontsize=10, color="tab:blue")
        more = m.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.1 if d.get("metric") else 1.01, 1.0), fontsize=9,
              frameon=False)
