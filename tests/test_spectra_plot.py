"""``inspect --plot``: each layer's error against the size of its factorization, from its singular
values, drawn to a file (the curves checked against an SVD done here, the file as a PNG)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from graphs import cnn_model, gemm_model
from onnx_alds.api import analyze
from onnx_alds.cli import main
from onnx_alds.spectra_plot import layer_curves

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_linear_layers_curve_is_its_singular_values_against_the_factors_size():
    m = gemm_model(f=24, c=40, seed=3)
    w = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    sv = np.linalg.svd(w, compute_uv=False)
    _, source, info = analyze(m)
    (curve,) = layer_curves(source, info)
    ranks = np.arange(len(curve.kept))
    # rank j keeps j (f + c) of the f c weights (the bias stays as it is), while that is fewer
    assert np.allclose(curve.kept, ranks * (24 + 40) / (24 * 40), rtol=1e-6)
    assert len(curve.kept) == int(np.ceil(24 * 40 / (24 + 40)))
    assert np.allclose(curve.error, np.append(sv, 0)[ranks] / sv[0], rtol=1e-5)
    assert curve.error_at(0.5) == curve.error[ranks[curve.kept <= 0.5][-1]]
    assert curve.error_at(0.0) == 1.0 and curve.error_at(-1) is None


def test_inspect_plot_writes_a_png_and_keeps_the_table(tmp_path, capsys):
    src = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(src))
    before = src.read_bytes()
    assert main(["inspect", str(src), "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "compressible" in out and f"wrote {tmp_path / 's.png'}" in out
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG and src.read_bytes() == before
    for c in layer_curves(*analyze(cnn_model())[1:]):  # convolutions: the lowest error of any scheme at each size
        assert np.all(np.diff(c.kept) >= 0) and np.all(np.diff(c.error) <= 0) and c.kept.max() < 1.0
    assert main(["inspect", str(src), "--plot", str(src)]) == 2  # never over the input
    assert "is the file given as the input model" in capsys.readouterr().err and src.read_bytes() == before


def test_with_data_the_curve_is_the_output_error_on_it():
    """Inputs that span 3 directions: rank-3 factors fitted to them reproduce the layer's output on them
    (data-aware error ~0), while the weights' spectrum at rank 3 is far from it."""
    from onnx_alds.calibration import load_calibration, model_inputs
    from onnx_alds.spectra_plot import data_curves

    m = gemm_model(f=24, c=40, seed=3)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 3)) @ rng.standard_normal((3, 40))).astype(np.float32)
    _, source, info = analyze(m)
    (data,) = data_curves(source, info, load_calibration({"x": x}, model_inputs(m)), provider="cpu")
    (weights,) = layer_curves(source, info)
    assert np.all(np.diff(data.error) <= 1e-12) and data.error[0] <= 1.0
    at3 = np.searchsorted(data.kept, 3 * (24 + 40) / (24 * 40) - 1e-9)  # the first size at least rank 3's
    assert data.error[at3] < 1e-3 < 0.3 < weights.error[3]


def test_inspect_plot_with_calibration(tmp_path, capsys):
    src = tmp_path / "g.onnx"
    onnx.save(gemm_model(f=24, c=40), str(src))
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32))
    assert main(["inspect", str(src), "--plot", str(tmp_path / "d.png"), "--calibration", str(tmp_path / "cal.npz")]) == 0
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG
    assert main(["inspect", str(src), "--calibration", str(tmp_path / "cal.npz")]) == 2  # nothing to draw it in
    assert "give --plot too" in capsys.readouterr().err
    assert main(["inspect", str(src), "--plot", str(tmp_path / "cal.npz"), "--calibration", str(tmp_path / "cal.npz")]) == 2
