"""Shapes from onnxruntime where onnx shape inference stops (onnx_alds.shapes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser

from onnx_alds.errors import UsageError
from onnx_alds.extract import infer_shapes
from onnx_alds.shapes import inputs_from_shapes, runtime_shapes

# an attention-style reshape: (N, T, 16) -> (N, T/2, 32) with the target computed
# from the input's shape at run time, then a linear layer with a constant weight
RUNTIME_RESHAPE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, T, 16] x) => (float[N, ?, 10] y) {
  s = Shape(x)
  b = Gather<axis=0>(s, i0)
  t = Gather<axis=0>(s, i1)
  f = Gather<axis=0>(s, i2)
  t2 = Div(t, two)
  f2 = Mul(f, two)
  target = Concat<axis=0>(b, t2, f2)
  z = Reshape(x, target)
  y = MatMul(z, w)
}"""


def runtime_reshape_model() -> onnx.ModelProto:
    m = parser.parse_model(RUNTIME_RESHAPE)
    ints = {"i0": [0], "i1": [1], "i2": [2], "two": [2]}
    m.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items())
    w = np.random.default_rng(0).standard_normal((32, 10)).astype(np.float32)
    m.graph.initializer.append(numpy_helper.from_array(w, "w"))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_runtime_shapes_give_the_dims_shape_inference_cannot():
    m = runtime_reshape_model()
    # the premise: onnx shape inference (with data propagation) leaves the MatMul input's dims unknown
    inferred = infer_shapes(m, {"x": [1, 12, 16]})
    assert not all(isinstance(d, int) for d in inferred.get("z", ["?"]))
    feeds = inputs_from_shapes(m, {"x": [3, 12, 16]})
    shapes = runtime_shapes(m, feeds, ["z", "y"])
    assert shapes == {"z": [3, 6, 32], "y": [3, 6, 10]}
    # and they are the shapes of the values onnxruntime computes
    import onnxruntime as ort

    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert list(y.shape) == shapes["y"]


def test_runtime_shapes_of_every_node_output_and_the_model_is_left_as_it_was():
    m = runtime_reshape_model()
    before = m.SerializeToString()
    feeds = inputs_from_shapes(m, {"x": [2, 4, 16]})
    shapes = runtime_shapes(m, feeds)
    produced = [o for n in m.graph.node for o in n.output]
    assert set(shapes) == set(produced)
    assert shapes["s"] == [3] and shapes["target"] == [3] and shapes["z"] == [2, 2, 32]
    assert m.SerializeToString() == before
    # inputs and initializers asked for by name come from the feeds and the weights
    assert runtime_shapes(m, feeds, ["x", "w"]) == {"x": [2, 4, 16], "w": [32, 10]}


def test_runtime_shapes_skip_non_numeric_tensors_and_refuse_them_by_name():
    m = parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      zero = Constant<value = float {0.0}>()
      pos = Greater(x, zero)
      y = Where(pos, x, zero)
    }""")
    feeds = inputs_from_shapes(m, {"x": [5, 4]})
    shapes = runtime_shapes(m, feeds)
    assert "pos" not in shapes and shapes["y"] == [5, 4] and shapes["zero"] == []
    with pytest.raises(UsageError, match="'pos' has type tensor\\(bool\\)"):
        runtime_shapes(m, feeds, ["pos"])
    with pytest.raises(UsageError, match="'nope' is not produced by a node"):
        runtime_shapes(m, feeds, ["nope"])
    with pytest.raises(UsageError, match="no input array given for model input 'x'"):
        runtime_shapes(m, {}, ["y"])


def test_runtime_shapes_of_a_model_over_the_protobuf_limit(monkeypatch):
    """Past the threshold the model runs from a file with external data; the
    threshold is lowered so that the test model takes that path."""
    import onnx_alds.shapes as shapes_mod

    monkeypatch.setattr(shapes_mod, "EXTERNAL_DATA_THRESHOLD", 100)
    m = runtime_reshape_model()
    before = m.SerializeToString()
    shapes = runtime_shapes(m, inputs_from_shapes(m, {"x": [1, 8, 16]}), ["z"])
    assert shapes == {"z": [1, 4, 32]}
    assert m.SerializeToString() == before


def test_a_missing_dynamic_dim_is_one_sentence_naming_input_and_axis():
    m = runtime_reshape_model()
    with pytest.raises(UsageError) as e:
        inputs_from_shapes(m, None)
    msg = str(e.value)
    assert "input 'x'" in msg and "axis 0" in msg and "(N)" in msg and msg.count(". ") == 0 and "\n" not in msg
    with pytest.raises(UsageError, match="input 'x' has a dynamic size \\(T\\) on axis 1"):
        inputs_from_shapes(m, {"x": [2, None, 16]})
    with pytest.raises(UsageError, match="has size 16 on axis 2, not 8"):
        inputs_from_shapes(m, {"x": [2, 4, 8]})
    with pytest.raises(UsageError, match="has 3 axes"):
        inputs_from_shapes(m, {"x": [2, 4]})
    with pytest.raises(UsageError, match="'y' is not an input"):
        inputs_from_shapes(m, {"y": [1]})


def test_inputs_from_shapes_fill_and_dtypes():
    m = parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, S] x, int64[2, S] ids) => (float[2, S] y) {
      f = Cast<to = 1>(ids)
      y = Add(x, f)
    }""")
    z = inputs_from_shapes(m, {"x": [2, 7], "ids": [-1, 7]}, fill="zeros")
    assert z["x"].shape == (2, 7) and z["x"].dtype == np.float32 and not z["x"].any()
    assert z["ids"].dtype == np.int64 and not z["ids"].any()
    a = inputs_from_shapes(m, {"x": [2, 7], "ids": [2, 7]}, seed=3)
    b = inputs_from_shapes(m, {"x": [2, 7], "ids": [2, 7]}, seed=3)
    assert np.array_equal(a["x"], b["x"]) and a["x"].std() > 0
    assert set(np.unique(a["ids"])) <= {0, 1}
