"""``inspect --plot``: how compressible each layer is, from the singular values of its weight.

For every compressible layer, the left panel draws the relative error ``ε = σ_{j+1} / σ_1`` of its
best rank-j factorization (k = 1: the spectral error model of DESIGN.md) against the fraction of the
layer's parameters that factorization keeps; where a layer has several folding schemes, the lowest
error any of them gives at that size.  The right panel gives each layer's error at a quarter and at
half of its parameters.  A layer whose curve falls steeply compresses cheaply; one that stays high (a
flat spectrum) is where a global budget costs the most.  These are the curves ALDS trades against each
other under one budget (it also tries k > 1 channel groups, more choices that can only lower them).

With calibration data (:func:`data_curves`) the error is the data-aware one instead: the relative
error of the layer's output on the calibration inputs, ``‖(W − Ŵ) X‖ / ‖W X‖``, of the best rank-j
factors for that data (whitened SVD, bias correction), which is what ``rewrite --calibration``
selects with.  On trained models it falls much faster than the weights' spectrum says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cost import factorized_params
from .error_model import WeightError
from .report import save_figure

__all__ = ["LayerCurve", "data_curves", "layer_curves", "plot_spectra", "spectra_figure"]

SIZES = (0.25, 0.5)  # the kept fractions at which the right panel gives each layer's error


@dataclass
class LayerCurve:
    """One layer's lowest error against the fraction of its parameters a factorization keeps (k = 1,
    any of its schemes, every rank whose factors are smaller than the dense layer)."""

    name: str
    kept: np.ndarray  # (n,) params of the factors / the layer's params, increasing
    error: np.ndarray  # (n,) the lowest ε at that size or below, non-increasing

    def error_at(self, fraction: float) -> float | None:
        """The lowest error within ``fraction`` of the layer's parameters (None: not even rank 1 fits)."""
        ok = np.nonzero(self.kept <= fraction)[0]
        return float(self.error[ok[-1]]) if len(ok) else None


def layer_curves(source, info, *, cache_dir=None, progress: bool = False, emodel=None) -> list[LayerCurve]:
    """:class:`LayerCurve` of every compressible layer of an analysed model (``api.analyze``), with the
    weights' spectral error, or ``emodel``'s (an error model of :mod:`onnx_alds.error_model`) where
    given: the layers and schemes it can measure."""
    emodel = emodel if emodel is not None else WeightError("spectral", cache_dir=cache_dir)
    schemes = {l.name: [s for s in l.schemes if emodel.offers(l, 1, s)] for l in info.candidates}
    layers = [l for l in info.candidates if schemes[l.name]]
    configs = {l.name: [(1, s) for s in schemes[l.name]] for l in layers}
    curves = emodel.curves(source, layers, configs, progress=progress)
    out = []
    for l in layers:
        points = []  # (kept, error) of every scheme and rank smaller than the layer
        extra = emodel.extra_params(l)  # the bias a data-aware fit adds
        for s in schemes[l.name]:
            for j, e in enumerate(np.asarray(curves[l.name][(1, s)], dtype=np.float64)):
                kept = (factorized_params(l.geometry, 1, s, j) + extra) / l.params
                if kept < 1.0:
                    points.append((kept, e))
        points.sort()
        kept = np.array([p[0] for p in points])
        error = np.minimum.accumulate(np.array([p[1] for p in points])) if points else np.zeros(0)
        out.append(LayerCurve(l.name, kept, error))
    return out


def data_curves(source, info, data, *, provider: str = "auto", progress: bool = False) -> list[LayerCurve]:
    """:func:`layer_curves` with the data-aware error on ``data`` (checked calibration data: a dict of
    arrays or a stream, :func:`~onnx_alds.calibration.load_calibration`); one pass of the model over
    it collects every layer's input moments."""
    from .error_model import error_model
    from .pipeline.stages import calibrate

    _, moments, _, _ = calibrate(source, info, data, provider=provider, progress=progress)
    return layer_curves(source, info, progress=progress, emodel=error_model("data", moments=moments))


def spectra_figure(curves: list[LayerCurve], title: str = "", what: str = "ε = σ_{j+1} / σ_1"):
    """The figure of :func:`plot_spectra` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, max(4.5, 0.22 * n + 1.5)),
                                 gridspec_kw={"width_ratios": [1.1, 1]})
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(curves):
        ax.plot(c.kept, c.error, color=cmap(i / max(n - 1, 1)), lw=1.2, alpha=0.85,
                label=c.name if n <= 12 else None)
    for f in SIZES:
        ax.axvline(f, color="grey", ls=":", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of the layer's parameters kept (rank-j factors, k = 1)")
    ax.set_ylabel(f"relative error {what}")
    ax.set_title("error against size, one line per layer (input → output: dark → light)", fontsize=9)
    if n <= 12:
        ax.legend(fontsize=7, loc="upper right")
    y = np.arange(n)
    h = 0.8 / len(SIZES)
    for i, f in enumerate(SIZES):
        err = [c.error_at(f) for c in curves]
        bx.barh(y + (i - (len(SIZES) - 1) / 2) * h, [e if e is not None else 0.0 for e in err], height=h,
                color=f"C{i}", label=f"at {f:g} of its parameters")
        for yy, e in zip(y + (i - (len(SIZES) - 1) / 2) * h, err):
            if e is None:
                bx.text(0.01, yy, "too small to factorize", fontsize=6, va="center")
    bx.set_yticks(y, [_short(c.name) for c in curves], fontsize=7)
    bx.invert_yaxis()
    bx.set_xlim(0, 1)
    bx.set_xlabel("relative error ε of the layer's best factorization (lower: cheaper to compress)")
    bx.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(SIZES), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _short(name: str, width: int = 30) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_spectra(curves: list[LayerCurve], path, title: str = "", what: str = "ε = σ_{j+1} / σ_1") -> None:
    """Write :func:`spectra_figure` to ``path`` atomically (the format from its suffix, default png)."""
    save_figure(spectra_figure(curves, title, what), path)
