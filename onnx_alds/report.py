"""The rewrite report (JSON) and its plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .io import atomic_write_bytes


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
    rel_error: float = 0.0
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
        lines.append(f"max relative operator-norm error {self.max_rel_error:.4f}")
        for name, err in self.baselines.items():
            what = f"max error {err:.4f}" if err is not None else "cannot meet the budget"
            lines.append(f"  {name:<10} at the same budget: {what}")
        b = self.budget
        if b.get("metric") == "latency" and b.get("measured_ms") is not None:
            lines.append(f"latency on {b['provider']} (batch 1, {b['threads']} threads): predicted speed-up "
                         f"{b['model_ms'] / b['predicted_ms']:.2f}x, measured {b['measured_speedup']:.2f}x "
                         f"({b['measured_ms_before']:.3f} ms -> {b['measured_ms']:.3f} ms)")
        v = self.validation
        if v:
            lines.append(f"validation on {v['provider']}: max |diff| {v['max_abs_diff']:.3g}, "
                         f"rel L2 {v['rel_l2']:.3g}")
            if v.get("latency_ms_before") is not None:
                lines.append(f"latency {v['latency_ms_before']:.3f} ms -> {v['latency_ms_after']:.3f} ms "
                             f"({v['latency_ms_before'] / max(v['latency_ms_after'], 1e-9):.2f}x)")
        return "\n".join(lines)


def plot_report(report: Report, path) -> None:
    """Per-layer relative error and kept fraction of parameters, so a user sees
    where the budget went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [l for l in report.layers if l.status != "skipped"]
    names = [l.name for l in layers]
    x = range(len(layers))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(layers) + 3), 7), sharex=True)
    a1.bar(x, [l.rel_error for l in layers], color="tab:red")
    a1.axhline(report.max_rel_error, color="k", lw=0.8, ls="--", label=f"max ε = {report.max_rel_error:.3f}")
    a1.set_ylabel("relative error ε")
    a1.legend(loc="upper right")
    kept = [l.params_after / l.params_before if l.params_before else 1.0 for l in layers]
    colors = ["tab:blue" if l.status == "decomposed" else "tab:gray" for l in layers]
    a2.bar(x, kept, color=colors)
    for i, l in enumerate(layers):
        if l.status == "decomposed":
            a2.text(i, kept[i] + 0.02, f"k{l.k}{l.scheme}", ha="center", va="bottom", fontsize=6, rotation=90)
    a2.set_ylabel("params kept (layer)")
    a2.set_ylim(0, 1.25)
    a2.set_xticks(list(x))
    a2.set_xticklabels(names, rotation=90, fontsize=6)
    fig.suptitle(f"{report.method}: params {report.params_fraction:.3f} of original, "
                 f"max ε {report.max_rel_error:.3f}")
    fig.tight_layout()
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format=str(path).rsplit(".", 1)[-1] if "." in str(path) else "png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
