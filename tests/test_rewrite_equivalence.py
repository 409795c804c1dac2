"""Full-rank factorizations reproduce the layer through onnxruntime (≤ 1e-5)."""

import numpy as np
import onnx
import pytest

from graphs import conv_model, gemm_model, matmul_model, rel_err, run
from onnx_alds import apply_plan
from onnx_alds.api import analyze
from onnx_alds.cost import full_rank
from onnx_alds.plan import LayerPlan, Plan

RNG = np.random.default_rng(123)


def full_rank_plan(model, name, k, scheme):
    _, _, info = analyze(model)
    layer = info.layer(name)
    return Plan([LayerPlan(name, layer.weight_name, k, scheme, full_rank(layer.geometry, k, scheme))])


def check_reproduces(model, name, k, scheme, x, tol=1e-5):
    new = apply_plan(model, full_rank_plan(model, name, k, scheme))
    onnx.checker.check_model(new, full_check=True)
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("Conv") + ops.count("MatMul") + ops.count("Gemm") >= 2  # it was really replaced
    y0, y1 = run(model, {"x": x})[0], run(new, {"x": x})[0]
    assert y1.shape == y0.shape and y1.dtype == y0.dtype
    assert rel_err(y0, y1) <= tol
    return new


CONV_CASES = {
    "plain3x3": dict(kernel=(3, 3), in_hw=(9, 9)),
    "stride2": dict(kernel=(3, 3), in_hw=(10, 9), strides=(2, 2), pads=(1, 1, 1, 1)),
    "asym_pads": dict(kernel=(3, 3), in_hw=(9, 11), pads=(0, 2, 1, 0)),
    "dilation": dict(kernel=(3, 3), in_hw=(12, 12), dilations=(2, 3), pads=(2, 3, 2, 3)),
    "nonsquare": dict(kernel=(5, 3), in_hw=(11, 8), strides=(2, 1), pads=(2, 1, 1, 1)),
    "no_bias": dict(kernel=(3, 2), in_hw=(9, 9), bias=False),
    "same_upper": dict(kernel=(3, 3), in_hw=(9, 10), strides=(2, 2), auto_pad="SAME_UPPER"),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("scheme", ["s0", "s1", "s2", "s3"])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_conv2d_full_rank(case, scheme, k):
    kw = CONV_CASES[case]
    model = conv_model(f=8, c=6, **kw)
    x = RNG.standard_normal((2, 6, *kw["in_hw"])).astype(np.float32)
    check_reproduces(model, "conv", k, scheme, x)


@pytest.mark.parametrize("scheme", ["s0", "s3"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_full_rank(scheme, k, bias):
    model = conv_model(f=6, c=4, kernel=(3,), in_hw=(17,), strides=(2,), pads=(1, 2), dilations=(2,), bias=bias)
    x = RNG.standard_normal((3, 4, 17)).astype(np.float32)
    check_reproduces(model, "conv", k, scheme, x)


def test_conv1d_rejects_split_schemes():
    from onnx_alds.errors import UsageError

    model = conv_model(f=6, c=4, kernel=(3,), in_hw=(17,))
    with pytest.raises(UsageError, match="scheme s1 does not apply"):
        apply_plan(model, Plan([LayerPlan("conv", "conv.weight", 1, "s1", 2)]))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_full_rank(trans_b, alpha, beta, k, bias):
    model = gemm_model(f=7, c=12, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias)
    x = RNG.standard_normal((4, 12)).astype(np.float32)
    check_reproduces(model, "fc", k, "s0", x)


@pytest.mark.parametrize("lead", [(), (5,), (3, 5)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_matmul_full_rank(lead, k):
    model = matmul_model(f=10, c=12, lead=lead)
    x = RNG.standard_normal((2, *lead, 12)).astype(np.float32)
    new = check_reproduces(model, "proj", k, "s0", x)
    # the grouped linear is never a dense block-diagonal matrix
    largest = max(np.prod(t.dims) for t in new.graph.initializer)
    assert largest <= 12 * 10


def test_matmul_weight_from_constant_node():
    model = matmul_model(f=10, c=12, lead=(5,), as_constant_node=True)
    x = RNG.standard_normal((2, 5, 12)).astype(np.float32)
    new = check_reproduces(model, "proj", 2, "s0", x)
    assert not any(n.op_type == "Constant" for n in new.graph.node)  # the dead weight is gone


def test_float16_weights():
    model = conv_model(f=8, c=6, kernel=(3, 3), in_hw=(9, 9), dtype=np.float16)
    x = RNG.standard_normal((2, 6, 9, 9)).astype(np.float16)
    new = apply_plan(model, full_rank_plan(model, "conv", 2, "s1"))
    y0, y1 = run(model, {"x": x})[0], run(new, {"x": x})[0]
    assert y1.dtype == np.float16
    assert rel_err(y0, y1) <= 2e-3  # float16 arithmetic
