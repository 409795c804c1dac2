"""The rewrite keeps the model's interface and what it does not touch
(issue 11, items 5–7): weights that are graph outputs or overridable graph
inputs, IR version 3 models, unused initializers, training_info."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_alds
from graphs import run


def mlp(*, weight_output=False, weight_input=False, ir=8, opset=17, unused=False, training=False):
    rng = np.random.default_rng(0)
    text = f"""<ir_version: {ir}, opset_import: ["" : {opset}]>
    g (float[2, 16] x) => (float[2, 16] y) {{
        h = MatMul (x, w1)
        r = Relu (h)
        y = MatMul (r, w2)
    }}"""
    m = onnx.parser.parse_model(text)
    m.graph.node[0].name, m.graph.node[2].name = "fc1", "fc2"
    m.graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
                                numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w2")])
    if weight_output:
        m.graph.output.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [32, 16]))
    if weight_input:
        m.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [16, 32]))
    if ir < 4:
        for t in m.graph.initializer:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if unused:
        m.graph.initializer.append(numpy_helper.from_array(np.arange(5, dtype=np.float32), "unused"))
    if training:
        m.training_info.add().initialization.name = "init"
    return m


def rewrite(m, **kw):
    return onnx_alds.rewrite(m, keep_params=0.6, allow_slower=True, compare=False, provider="cpu", **kw)


def test_weight_that_is_a_graph_output_is_left_alone():
    m = mlp(weight_output=True)
    new, rep = rewrite(m)
    st = {l.name: (l.status, l.reason) for l in rep.layers}
    assert st["fc2"] == ("skipped", "weight 'w2' is also a graph output") and st["fc1"][0] == "decomposed"
    x = {"x": np.ones((2, 16), np.float32)}
    np.testing.assert_array_equal(run(new, x)[1], run(m, x)[1])  # the weight output is intact


def test_overridable_weight_keeps_the_interface():
    m = mlp(weight_input=True)
    new, rep = rewrite(m)
    assert [i.name for i in new.graph.input] == ["x", "w1"]
    assert {l.name: l.status for l in rep.layers}["fc1"] == "skipped"
    w = np.zeros((16, 32), np.float32)
    x = np.ones((2, 16), np.float32)
    # overriding the weight at run time still works: a zero first layer zeroes the output, as in the original
    np.testing.assert_array_equal(run(new, {"x": x, "w1": w})[0], run(m, {"x": x, "w1": w})[0])
    # and without it, the input's default is still the original weight
    w1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1"))
    np.testing.assert_array_equal(run(new, {"x": x})[0], run(new, {"x": x, "w1": w1})[0])


def test_ir3_models_are_rewritten_as_ir3():
    m = mlp(ir=3, opset=8)
    onnx.checker.check_model(m)
    new, rep = rewrite(m)
    assert new.ir_version == 3 and any(l.status == "decomposed" for l in rep.layers)
    onnx.checker.check_model(new)
    assert {t.name for t in new.graph.initializer} <= {i.name for i in new.graph.input}


def test_unused_initializers_stay_and_training_info_is_reported():
    new, rep = rewrite(mlp(unused=True, training=True))
    kept = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    np.testing.assert_array_equal(kept["unused"], np.arange(5, dtype=np.float32))
    assert len(new.training_info) == 0
    assert any("training_info" in w for w in rep.warnings) and rep.budget["dropped"]


@pytest.mark.parametrize("clash", ["fc1/alds_decoder.weight", "fc1/alds_encoder_output"])
def test_emitted_names_are_fresh_against_the_model(clash):
    """A tensor of the model that happens to have an emitted name is not rewired."""
    m = mlp()
    m.graph.initializer.append(numpy_helper.from_array(np.full((3,), 7.0, np.float32), clash))
    m.graph.output.append(helper.make_tensor_value_info(clash, TensorProto.FLOAT, [3]))
    new, rep = rewrite(m)
    x = {"x": np.ones((2, 16), np.float32)}
    np.testing.assert_array_equal(run(new, x)[1], np.full((3,), 7.0, np.float32))
    assert rep.validation["rel_l2"] < 1.0


@pytest.mark.parametrize("error", ["spectral", "paper", "frobenius"])
def test_weights_near_1e200_compress_like_their_scaled_down_copy(error):
    """Errors are relative: a float64 layer (weight and bias) times 1e200 gives the
    same choices and errors as the layer itself (no overflow in spectra, factors
    or validation)."""
    from graphs import gemm_model

    small = gemm_model(f=7, c=12, dtype=np.float64)
    big = gemm_model(f=7, c=12, dtype=np.float64)
    for t in big.graph.initializer:  # the outputs scale by 1e200, their relative errors do not
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1e200, t.name))
    _, rs = onnx_alds.rewrite(small, keep_params=0.7, error=error, allow_slower=True, compare=False, provider="cpu")
    _, rb = onnx_alds.rewrite(big, keep_params=0.7, error=error, allow_slower=True, compare=False, provider="cpu")
    (ls,), (lb,) = [l for l in rs.layers if l.status == "decomposed"], [l for l in rb.layers if l.status == "decomposed"]
    assert (ls.k, ls.scheme, ls.rank) == (lb.k, lb.scheme, lb.rank)
    assert lb.rel_error == pytest.approx(ls.rel_error, rel=1e-9)
    assert lb.measured_error == pytest.approx(ls.measured_error, rel=1e-6)
    assert rb.validation["rel_l2"] == pytest.approx(rs.validation["rel_l2"], rel=1e-9)
