"""report.png: readable layer names, legends and notes beside the bars (never
over them), an entry for kept layers, and the numbers a reader needs."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from graphs import cnn_model  # noqa: E402
from onnx_alds import rewrite  # noqa: E402
from onnx_alds.report import plot_report, report_figure  # noqa: E402


@pytest.fixture(scope="module")
def report():
    _, rep = rewrite(cnn_model(), keep_params=0.5, validate=True, allow_slower=True)
    return rep


def test_legend_and_notes_never_cover_a_bar(report):
    import matplotlib.pyplot as plt

    fig = report_figure(report)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    a1, a2 = fig.axes
    boxes = [a1.get_legend().get_window_extent(r)] + [t.get_window_extent(r) for t in a2.texts
                                                       if "\n" in t.get_text()]
    assert len(boxes) == 2
    bars = [p.get_window_extent(r) for ax in (a1, a2) for p in ax.patches]
    assert bars
    for box in boxes:
        assert not any(box.overlaps(b) for b in bars)
        assert box.x1 <= fig.bbox.x1 + 1  # and inside the figure
    labels = [t.get_text() for t in a1.get_legend().get_texts()]
    assert "kept as is" in labels
    assert min(t.get_fontsize() for t in a2.get_xticklabels()) >= 7  # was 6 (~5 pt at 120 dpi)
    assert [t.get_text() for t in a2.get_xticklabels()] == [l.name for l in report.layers if l.status != "skipped"]
    plt.close(fig)


def test_notes_give_baselines_and_validation(report, tmp_path):
    fig = report_figure(report)
    notes = next(t.get_text() for t in fig.axes[1].texts if "\n" in t.get_text())
    for name, err in report.baselines.items():
        assert f"max ε ({name}) {err:.3f}" in notes
    assert f"validation rel L2 {report.validation['rel_l2']:.3g}" in notes
    out = tmp_path / "r.png"
    plot_report(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_search_is_plotted_against_the_kept_fraction(tmp_path):
    """No budget: a third panel draws every probe of the search (output error and, with a task metric,
    its score) against the fraction it kept, with the tolerance, the metric's floor and the fraction kept."""
    import numpy as np

    model = cnn_model()
    cal = {"x": np.random.default_rng(1).standard_normal((48, 3, 16, 16)).astype(np.float32)}
    _, rep = rewrite(model, calibration=cal, metric=lambda path: 100.0 - 10 * float(np.random.default_rng(0).random()),
                     max_metric_drop=50, max_output_error=0.3, provider="cpu", allow_slower=True, compare=False)
    fig = report_figure(rep)
    d = rep.budget["default"]
    search, metric = fig.axes[2], fig.axes[3]
    xs, ys = search.lines[0].get_data()
    assert list(xs) == sorted(t[0] for t in d["tried"]) and list(ys) == [t[1] for t in sorted(d["tried"])]
    assert list(metric.lines[0].get_data()[1]) == [t[3] for t in sorted(d["tried"])]
    labels = [t.get_text() for t in search.get_legend().get_texts()]
    assert f"kept {d['kept']:.3g}" in labels and "tolerance 0.3" in labels and any("metric floor" in l for l in labels)
    plot_report(rep, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
