"""Layer extraction: what is compressible, why the rest is not, params and FLOPs."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphs import _model, cnn_model, initializer_floats, matmul_model
from onnx_alds import inspect
from onnx_alds.extract import parse_input_shapes


def reasons(model, **kw):
    return {l.name: (l.status, l.reason) for l in inspect(model, **kw).layers}


def test_cnn_layers_params_flops():
    info = inspect(cnn_model())
    assert [l.name for l in info.candidates] == ["c1", "c2", "c3", "fc"]
    assert info.params_total == initializer_floats(cnn_model())
    by = {l.name: l for l in info.layers}
    assert by["c2"].flops == 32 * 16 * 9 * 8 * 8  # stride 2: 16 → 8
    assert by["fc"].flops == 32 * 10  # dynamic batch counts as 1
    # the depthwise conv (8×8 output) counts in the total but is not compressible
    assert info.flops_total == sum(l.flops for l in info.candidates) + 32 * 9 * 8 * 8
    assert info.input_shapes == {"x": [1, 3, 16, 16]}


def test_skip_reasons():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "shared")
    wi = numpy_helper.from_array(rng.integers(-3, 3, (4, 4)).astype(np.int32), "intw")
    nan = rng.standard_normal((4, 4)).astype(np.float32)
    nan[0, 0] = np.nan
    wn = numpy_helper.from_array(nan, "nanw")
    nodes = [
        helper.make_node("MatMul", ["x", "shared"], ["a"], name="m1"),
        helper.make_node("MatMul", ["a", "shared"], ["b"], name="m2"),
        helper.make_node("MatMul", ["b", "b"], ["c"], name="runtime"),
        helper.make_node("Cast", ["c"], ["ci"], name="cast", to=TensorProto.INT32),
        helper.make_node("MatMul", ["ci", "intw"], ["d"], name="intmm"),
        helper.make_node("MatMul", ["c", "nanw"], ["e"], name="nanmm"),
        helper.make_node("Gemm", ["e", "gw"], ["g"], name="gemm_t", transA=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    outs = [helper.make_tensor_value_info("d", TensorProto.INT32, [4, 4]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [4, 4])]
    gw = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "gw")
    r = reasons(_model(nodes, [x], outs, [w, wi, wn, gw]))
    assert "shared by 2 nodes" in r["m1"][1] and r["m2"][0] == "skipped"
    assert r["runtime"] == ("skipped", "weight is computed at run time")
    assert "not a floating-point type" in r["intmm"][1]
    assert "NaN or Inf" in r["nanmm"][1]
    assert "transA=1" in r["gemm_t"][1]


def test_no_saving_layer_is_skipped():
    r = reasons(matmul_model(f=1, c=12, lead=()))
    assert "no factorization is smaller" in r["proj"][1]


def test_dynamic_dims_need_input_shape():
    info = inspect(matmul_model(f=10, c=12, lead=("T",)))
    assert info.candidates[0].flops is None and info.flops_total is None
    info = inspect(matmul_model(f=10, c=12, lead=("T",)), input_shapes=parse_input_shapes(["x:1,7,12"]))
    assert info.candidates[0].flops == 7 * 12 * 10


def test_constant_node_weights_are_found_and_counted():
    m = matmul_model(f=10, c=12, lead=(5,), as_constant_node=True)
    info = inspect(m)
    assert info.candidates[0].weight_name == "proj.weight"
    assert info.params_total == 120
