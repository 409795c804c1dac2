"""Loading and saving: external data, atomic writes, the model left intact."""

import subprocess
import sys

import numpy as np
import onnx

from graphs import cnn_model, rel_err, run
from onnx_alds.io import load_model, save_model


def save_external(model, path):
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)


def test_save_with_external_data_leaves_model_intact(tmp_path):
    m = cnn_model()
    before = m.graph.SerializeToString()
    written = save_model(m, tmp_path / "m.onnx", external_data=True)
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    assert m.graph.SerializeToString() == before  # the caller's model still holds its weights
    from onnx import numpy_helper

    again = onnx.load(str(tmp_path / "m.onnx"))
    for a, b in zip(m.graph.initializer, again.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp files left


def test_rewrite_model_with_external_data(tmp_path):
    src = tmp_path / "ext.onnx"
    save_external(cnn_model(), src)
    data_before = (tmp_path / "ext.onnx.data").read_bytes()
    out = tmp_path / "out.onnx"
    p = subprocess.run([sys.executable, "-m", "onnx_alds", "rewrite", str(src), str(out), "--keep-params", "0.6",
                        "--allow-slower"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "ext.onnx.data").read_bytes() == data_before
    # the same model stored inline gives the same rewrite: external data changes nothing
    inline, out_inline = tmp_path / "inline.onnx", tmp_path / "out_inline.onnx"
    onnx.save(cnn_model(), str(inline))
    p = subprocess.run([sys.executable, "-m", "onnx_alds", "rewrite", str(inline), str(out_inline),
                        "--keep-params", "0.6", "--allow-slower"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    y0 = run(load_model(src), {"x": x})[0]
    y1 = run(load_model(out), {"x": x})[0]
    y2 = run(load_model(out_inline), {"x": x})[0]
    assert y1.shape == y0.shape
    assert rel_err(y2, y1) < 1e-6
    assert 0 < rel_err(y0, y1) < 0.5  # compressed (not the original), and still close to it


def test_missing_external_data_names_the_file(tmp_path):
    src = tmp_path / "ext.onnx"
    save_external(cnn_model(), src)
    (tmp_path / "ext.onnx.data").unlink()
    p = subprocess.run([sys.executable, "-m", "onnx_alds", "rewrite", str(src), str(tmp_path / "o.onnx")],
                       capture_output=True, text=True)
    assert p.returncode == 3
    assert "ext.onnx.data" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
