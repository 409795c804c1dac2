"""ConvTranspose, added as one spec (onnx_alds/ops/convtranspose.py): full
rank reproduces the layer through onnxruntime for every attribute that
matters, a budget is met, and the torch twin computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_alds
from graphs import rel_err, run
from onnx_alds.api import analyze
from onnx_alds.cost import full_rank
from onnx_alds.plan import LayerPlan, Plan


def deconv_model(c=8, f=6, kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), output_padding=(1, 1), bias=True,
                 seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, f, *kernel)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {c}, 5, 7] x) => (float y) {{
        y = ConvTranspose <strides = {list(strides)}, pads = {list(pads)}, output_padding = {list(output_padding)}>
            (x, up_w{', up_b' if bias else ''})
    }}"""
    model = onnx.parser.parse_model(text)
    model.graph.node[0].name = "up"
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "up_w"))
    if bias:
        model.graph.initializer.append(onnx.numpy_helper.from_array(b, "up_b"))
    return model


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("case", [dict(), dict(strides=(1, 1), pads=(0, 1, 2, 0), output_padding=(0, 0)),
                                  dict(kernel=(4, 2), bias=False), dict(kernel=(1, 1), pads=(0, 0, 0, 0))])
def test_full_rank_reproduces_the_transposed_conv(k, case):
    model = deconv_model(**case)
    _, _, info = analyze(model)
    (layer,) = info.candidates
    assert layer.op == "ConvTranspose"
    assert layer.schemes == (("s0",) if case.get("kernel") == (1, 1) else ("s0", "s3"))
    x = {"x": np.random.default_rng(1).standard_normal((2, 8, 5, 7)).astype(np.float32)}
    for s in layer.schemes:
        plan = Plan([LayerPlan("up", "up_w", k, s, full_rank(layer.geometry, k, s))])
        new = onnx_alds.apply_plan(model, plan)
        # s0: the transposed conv is the (grouped) encoder; s3: the decoder
        ops = ["ConvTranspose", "Conv"] if s == "s0" else ["Conv", "ConvTranspose"]
        assert [n.op_type for n in new.graph.node] == ops
        assert rel_err(run(model, x)[0], run(new, x)[0]) < 1e-5


def test_budget_is_met_and_macs_are_counted_per_input_position():
    model = deconv_model(c=32, f=32)
    _, _, info = analyze(model, {"x": [1, 32, 5, 7]})
    (layer,) = info.candidates
    assert layer.flops == 32 * 5 * 7 * 32 * 9 == info.flops_total
    new, rep = onnx_alds.rewrite(model, keep_params=0.4, input_shapes={"x": [1, 32, 5, 7]}, validate=False,
                                 allow_slower=True)
    assert rep.params_after <= 0.4 * rep.params_before and rep.layers[0].status == "decomposed"
    assert onnx_alds.extract.count_params(new) == rep.params_after
    assert rep.layers[0].measured_error <= rep.layers[0].rel_error + 1e-6  # spectral is an upper bound


def test_torch_twin_equals_the_emission(tmp_path):
    torch = pytest.importorskip("torch")
    from onnx_alds.torch import apply_plan, export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)).eval()
    x = torch.randn(2, 8, 5, 7)
    export(net, (x,), tmp_path / "up.onnx")
    model = onnx.load(str(tmp_path / "up.onnx"))
    _, _, info = analyze(model)
    (layer,) = info.candidates
    plan = Plan([LayerPlan(layer.name, layer.weight_name, 2, "s3", 2)])
    y_onnx = run(onnx_alds.apply_plan(model, plan), {model.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        y_torch = apply_plan(net, plan)(x).numpy()
    assert rel_err(y_onnx, y_torch) < 1e-5
