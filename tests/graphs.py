"""Small real ONNX graphs built with onnx.helper, for tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits, opset=OPSET):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def conv_model(f=8, c=6, kernel=(3, 3), in_hw=(9, 11), strides=None, pads=None, dilations=None, bias=True,
               dtype=np.float32, seed=0, auto_pad=None, spectrum_decay=None):
    """A single Conv (1-D when ``kernel`` has one entry) with a dynamic batch."""
    rng = np.random.default_rng(seed)
    nsp = len(kernel)
    w = rng.standard_normal((f, c, *kernel))
    if spectrum_decay is not None:  # give the weight a decaying spectrum, like trained weights
        m = w.reshape(f, -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        s = s * spectrum_decay ** np.arange(len(s))
        w = (u * s @ vt).reshape(w.shape)
    w = w.astype(dtype)
    inits = [numpy_helper.from_array(w, "conv.weight")]
    ins = ["x", "conv.weight"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(f).astype(dtype), "conv.bias"))
        ins.append("conv.bias")
    attrs = {}
    if strides:
        attrs["strides"] = list(strides)
    if pads:
        attrs["pads"] = list(pads)
    if dilations:
        attrs["dilations"] = list(dilations)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("Conv", ins, ["y"], name="conv", **attrs)
    x = helper.make_tensor_value_info("x", et, ["N", c, *in_hw[:nsp]])
    y = helper.make_tensor_value_info("y", et, ["N", f] + [f"out{i}" for i in range(nsp)])
    return _model([node], [x], [y], inits)


def _parse(text: str, inits: dict, opset: int = OPSET) -> onnx.ModelProto:
    """A model from onnx.parser text (``<ir_version: 8, opset_import: ...>``
    prepended) with ``inits`` (name → array) as initializers."""
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text)
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    return m


def _type(dtype) -> str:
    return {np.float32: "float", np.float16: "float16", np.float64: "double"}[np.dtype(dtype).type]


def gemm_model(f=7, c=12, trans_b=1, alpha=1.0, beta=1.0, bias=True, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    inits = {"fc.weight": rng.standard_normal((f, c) if trans_b else (c, f)).astype(dtype)}
    if bias:
        inits["fc.bias"] = rng.standard_normal(f).astype(dtype)
    t = _type(dtype)
    return _parse(f"""g ({t}[N, {c}] x) => ({t}[N, {f}] y) {{
        [fc] y = Gemm <transB = {trans_b}, alpha = {float(alpha)}, beta = {float(beta)}>
                      (x, "fc.weight"{', "fc.bias"' if bias else ''})
    }}""", inits)


def matmul_model(f=10, c=12, lead=(5,), seed=0, as_constant_node=False, dtype=np.float32):
    """``y = x @ W`` with x of shape (N, *lead, c)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, f)).astype(dtype)
    t, dims = _type(dtype), "".join(f"{d}, " for d in lead)
    m = _parse(f"""g ({t}[N, {dims}{c}] x) => ({t}[N, {dims}{f}] y) {{
        [proj] y = MatMul (x, "proj.weight")
    }}""", {} if as_constant_node else {"proj.weight": w})
    if as_constant_node:
        m.graph.node.insert(0, helper.make_node("Constant", [], ["proj.weight"], name="wconst",
                                                value=numpy_helper.from_array(w, "proj.weight")))
    return m


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def cnn_model(seed=0, decay=0.85, opset=OPSET, bn=False):
    """conv(3→16) → relu → conv(16→32, s2) → relu → conv1x1(32→32) → depthwise(32) → GAP → Gemm(32→10)."""
    rng = np.random.default_rng(seed)

    def w(shape):
        a = rng.standard_normal(shape)
        m = a.reshape(shape[0], -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        s = s * decay ** np.arange(len(s))
        return ((u * s @ vt).reshape(shape) / np.sqrt(m.shape[1])).astype(np.float32)

    inits = {"c1.weight": w((16, 3, 3, 3)), "c1.bias": rng.standard_normal(16).astype(np.float32),
             "c2.weight": w((32, 16, 3, 3)), "c3.weight": w((32, 32, 1, 1)), "dw.weight": w((32, 1, 3, 3)),
             "fc.weight": w((10, 32)), "fc.bias": rng.standard_normal(10).astype(np.float32)}
    m = _parse("""g (float[N, 3, 16, 16] x) => (float[N, 10] logits) {
        [c1] h1 = Conv <pads = [1, 1, 1, 1]> (x, "c1.weight", "c1.bias")
        [r1] a1 = Relu (h1)
        [c2] h2 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (a1, "c2.weight")
        [r2] a2 = Relu (h2)
        [c3] h3 = Conv (a2, "c3.weight")
        [dw] h4 = Conv <group = 32, pads = [1, 1, 1, 1]> (h3, "dw.weight")
        [gap] p = GlobalAveragePool (h4)
        [flat] pf = Flatten (p)
        [fc] logits = Gemm <transB = 1> (pf, "fc.weight", "fc.bias")
    }""", inits, opset)
    m.producer_name = "tests"
    helper.set_model_props(m, {"author": "onnx-alds tests"})
    return m


def initializer_floats(model: onnx.ModelProto) -> int:
    """Float elements of the initializers and Constant nodes, counted independently."""
    n = sum(int(np.prod(t.dims)) for t in model.graph.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE))
    for node in model.graph.node:
        if node.op_type == "Constant":
            t = node.attribute[0].t
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
                n += int(np.prod(t.dims))
    return n


def rank_share_plan(path, divisor: int = 2):
    """The plan that keeps 1/``divisor`` of each candidate layer's full rank (one group, at least rank 1)
    of the ONNX file at ``path``: a fixed plan for tests that need one without a budget."""
    from onnx_alds.api import analyze
    from onnx_alds.plan import LayerPlan, Plan

    _, _, info = analyze(onnx.load(str(path)))
    return Plan([LayerPlan(l.name, l.weight_name, 1, "s0", max(1, min(l.geometry.f, l.geometry.c) // divisor))
                 for l in info.candidates])
