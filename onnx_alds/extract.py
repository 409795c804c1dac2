"""Find the compressible layers of a graph, with their shapes, params and FLOPs.

A layer is a ``Conv`` with ``group=1`` (1-D or 2-D), a ``Gemm`` with
``transA=0``, or a ``MatMul`` whose second input is a constant 2-D weight.
Its weight is viewed as ``f × c × κ1 × κ2`` (outputs × inputs × kernel; a
linear layer has a 1×1 kernel), whatever its stored orientation, with Gemm's
``alpha`` folded in.  Every other Conv/Gemm/MatMul, and every ConvTranspose,
is listed with the reason it is left alone.  Shapes come from ONNX shape
inference with the model's inputs fixed (a dynamic batch counts as 1; other
dynamic sizes come from ``input_shapes``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from math import prod

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .cost import Geometry, factorized_params
from .errors import UsageError
from .folding import distinct_schemes

log = logging.getLogger(__name__)

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
LAYER_OPS = ("Conv", "Gemm", "MatMul")
# listed (with the reason) so that inspect and the report say why they stay
UNSUPPORTED_OPS = {"ConvTranspose": "ConvTranspose is not supported"}


@dataclass
class Layer:
    name: str
    op: str
    node: gs.Node = field(repr=False)
    weight_name: str = ""
    weight_shape: tuple[int, ...] = ()
    dtype: str = ""
    status: str = "candidate"  # candidate | skipped
    reason: str | None = None
    geometry: Geometry | None = None
    params: int = 0  # weight elements
    bias_params: int = 0
    flops: int | None = None
    # how to emit it
    spatial_rank: int = 0  # 1 or 2 for Conv, 0 for linear layers
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # (begin1, begin2, end1, end2)
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER are kept as such by the emitter
    activation_rank: int | None = None
    alpha: float = 1.0
    beta: float = 1.0
    trans_b: int = 0
    _weight: np.ndarray | None = field(default=None, repr=False)

    @property
    def schemes(self) -> tuple[str, ...]:
        return distinct_schemes(self.geometry.kernel) if self.geometry else ()

    @property
    def allow_groups(self) -> bool:
        """Grouped linear layers need the activation rank to reshape into groups."""
        return self.spatial_rank > 0 or self.activation_rank is not None

    def weight4(self) -> np.ndarray:
        """The weight as ``f × c × κ1 × κ2`` in its stored dtype (alpha folded in)."""
        w = self._weight
        if self.op == "Conv":
            return w if w.ndim == 4 else w[..., None]
        if self.op == "Gemm":
            m = w if self.trans_b else w.T
            if self.alpha != 1.0:
                with np.errstate(over="ignore", invalid="ignore"):  # extract skips a non-finite product
                    m = (m.astype(np.float64) * self.alpha).astype(w.dtype)
            return m[:, :, None, None]
        return w.T[:, :, None, None]  # MatMul: x @ W with W (c, f)


@dataclass
class ModelInfo:
    layers: list[Layer]
    params_total: int
    flops_total: int | None
    input_shapes: dict[str, list]
    shapes: dict[str, list] = field(repr=False, default_factory=dict)

    @property
    def candidates(self) -> list[Layer]:
        return [l for l in self.layers if l.status == "candidate"]

    def layer(self, name: str) -> Layer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)


# ----------------------------------------------------------------------------- shapes

def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["x:1,3,224,224", ...]`` → ``{"x": [1, 3, 224, 224]}``."""
    out = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = [int(d) for d in dims.replace("x", ",").split(",") if d]
        except ValueError:
            raise UsageError(f"--input-shape {spec!r} is not of the form NAME:D1,D2,...") from None
    return out


def fixed_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None) -> dict[str, list]:
    """Input dims with a dynamic batch set to 1 and ``given`` applied; other
    dynamic dims stay symbolic (their name, a string)."""
    given = dict(given or {})
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        dims = []
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif axis == 0:
                dims.append(1)
            else:
                dims.append(d.dim_param or f"?{axis}")
        if inp.name in given:
            g = given.pop(inp.name)
            if len(g) != len(dims) and inp.type.tensor_type.HasField("shape"):
                raise UsageError(
                    f"--input-shape gives {len(g)} dims for input {inp.name!r}, which has {len(dims)}")
            dims = list(g)
        out[inp.name] = dims
    if given:
        raise UsageError(f"--input-shape names {sorted(given)[0]!r}, which is not an input of the model")
    return out


def _weightless_copy(model: onnx.ModelProto, max_elements: int = 4096) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference in which large initializers are
    typed graph inputs instead of data, so no weight is copied."""
    m = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(m, f, getattr(model, f))
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        if prod(t.dims) <= max_elements and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, list]) -> dict[str, list]:
    """Tensor name → dims (ints, or strings for unknown dims) by onnx shape inference."""
    m = _weightless_copy(model)
    for inp in m.graph.input:
        if inp.name in input_shapes:
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[inp.name]:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = str(d)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # shape inference is best effort; layers then lack FLOPs
        log.warning("shape inference failed (%s); FLOPs will be unknown", e)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                               for d in t.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


# ----------------------------------------------------------------------------- counting

def _float_elements(graph: onnx.GraphProto) -> int:
    """Floating-point initializer and Constant elements, subgraphs included."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    n = sum(prod(t.dims) for t in graph.initializer if t.data_type in float_types)
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value" and a.t.data_type in float_types:
                n += prod(a.t.dims)
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                n += _float_elements(g)
    return n


def count_params(model: onnx.ModelProto) -> int:
    return _float_elements(model.graph)


# ----------------------------------------------------------------------------- extraction

def _constant_value(t: gs.Tensor):
    """The numpy value of a tensor that is an initializer or a Constant node's output."""
    if isinstance(t, gs.Constant):
        return t.values
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return v.values
    return None


def _spatial(dims, start: int, n: int):
    if not _known(dims) or len(dims) < start + n:
        return None
    sp = tuple(dims[start:start + n])
    return sp if n == 2 else (sp[0], 1)


def _conv_flops(layer_out, w) -> int | None:
    if not _known(layer_out):
        return None
    return int(prod(layer_out)) * int(prod(w.shape[1:]))


def _node_flops(node: gs.Node, shapes) -> int | None:
    """MACs of any Conv/Gemm/MatMul node (also the ones we do not compress)."""
    outs = shapes.get(node.outputs[0].name) if node.outputs else None
    if not _known(outs):
        return None
    if node.op == "Conv":
        wshape = shapes.get(node.inputs[1].name) or getattr(node.inputs[1], "shape", None)
        return int(prod(outs)) * int(prod(wshape[1:])) if _known(wshape) else None
    a = shapes.get(node.inputs[0].name)
    if not _known(a) or len(a) < 1:
        return None
    kdim = a[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else a[-1]
    return int(prod(outs)) * int(kdim)


def extract(model: onnx.ModelProto, graph: gs.Graph, input_shapes: dict[str, list[int]] | None = None) -> ModelInfo:
    """Analyse ``graph`` (imported from ``model``) and list every Conv/Gemm/MatMul."""
    fixed = fixed_input_shapes(model, input_shapes)
    shapes = infer_shapes(model, fixed)
    consumers: dict[str, int] = {}
    for node in graph.nodes:
        # a weight read inside an If/Loop/Scan body counts as shared too
        for n in [node] + [sn for sg in node.subgraphs(recursive=True) for sn in sg.nodes]:
            for t in n.inputs:
                consumers[t.name] = consumers.get(t.name, 0) + 1

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    layers: list[Layer] = []
    flops_total = 0
    names_seen: dict[str, int] = {}

    def unique(name: str) -> str:  # layer names key plans and reports: make repeats distinct
        if name in names_seen:
            names_seen[name] += 1
            name = f"{name}#{names_seen[name]}"
        names_seen.setdefault(name, 0)
        return name

    for node in graph.nodes:
        if node.op not in LAYER_OPS and node.op not in UNSUPPORTED_OPS:
            continue
        if node.op in LAYER_OPS:
            nf = _node_flops(node, shapes)
            flops_total = None if flops_total is None or nf is None else flops_total + nf
        if len(node.inputs) < 2:
            continue
        wt = node.inputs[1]
        name = unique(node.name or wt.name)
        layer = Layer(name=name, op=node.op, node=node, weight_name=wt.name)
        layers.append(layer)
        _classify(layer, node, shapes, consumers)
        if layer.status == "candidate" and layer.op != "Conv" and opset < 7:
            # the emitted Reshape needs opset 5, a Gemm decoder without `broadcast` opset 7
            _skip(layer, f"linear layers need opset 7 or newer (the model has opset {opset})")
        if layer.status == "candidate":
            layer.flops = layer.geometry.flops
        elif node.op in LAYER_OPS:
            layer.flops = nf  # what the layer costs even where it stays as it is
    # layers in If/Loop/Scan bodies and local functions stay as they are, listed with the reason
    nested = [(n, f"inside the body of {node.op} node {node.name!r}: subgraphs are not rewritten")
              for node in graph.nodes for sg in node.subgraphs(recursive=True) for n in sg.nodes]
    nested += [(n, f"inside local function {fn.name!r}: functions are not rewritten")
               for fn in getattr(graph, "functions", []) for n in fn.nodes]
    for n, reason in nested:
        if n.op in LAYER_OPS or n.op in UNSUPPORTED_OPS:
            weight = n.inputs[1] if len(n.inputs) > 1 else None
            name = unique(n.name or (weight.name if weight is not None else n.op))
            w = _constant_value(weight) if weight is not None else None
            layer = Layer(name=name, op=n.op, node=n, weight_name=weight.name if weight is not None else "",
                          status="skipped", reason=reason)
            if w is not None:
                layer.weight_shape, layer.dtype, layer.params = tuple(np.shape(w)), str(np.asarray(w).dtype), int(np.size(w))
            layers.append(layer)
    info = ModelInfo(layers=layers, params_total=count_params(model), flops_total=flops_total,
                     input_shapes=fixed, shapes=shapes)
    return info


def _skip(layer: Layer, reason: str) -> None:
    layer.status, layer.reason = "skipped", reason


def _classify(layer: Layer, node: gs.Node, shapes, consumers) -> None:
    wt = node.inputs[1]
    if node.op in UNSUPPORTED_OPS:
        w = _constant_value(wt)
        if w is not None:
            w = np.asarray(w)
            layer.weight_shape, layer.dtype, layer.params = tuple(int(d) for d in w.shape), str(w.dtype), int(w.size)
        bv = _constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        layer.bias_params = int(np.asarray(bv).size) if bv is not None else 0
        return _skip(layer, UNSUPPORTED_OPS[node.op])
    if node.op == "MatMul" and _constant_value(node.inputs[0]) is not None and _constant_value(wt) is None:
        return _skip(layer, "the constant operand is the first input of MatMul")
    w = _constant_value(wt)
    if w is None:
        return _skip(layer, "weight is computed at run time")
    w = np.asarray(w)
    layer.weight_shape, layer.dtype = tuple(int(d) for d in w.shape), str(w.dtype)
    layer.params = int(w.size)
    bias = node.inputs[2] if len(node.inputs) > 2 and node.op in ("Conv", "Gemm") else None
    if bias is not None and bias.name:
        bv = _constant_value(bias)
        layer.bias_params = int(np.asarray(bv).size) if bv is not None else 0
    if w.dtype not in FLOAT_DTYPES:
        if "float" in str(w.dtype):  # bfloat16, float8 (ml_dtypes)
            return _skip(layer, f"weight dtype {w.dtype} is not supported (float16, float32 and float64 are)")
        return _skip(layer, f"weight dtype {w.dtype} is not a floating-point type")
    if consumers.get(wt.name, 0) > 1:
        return _skip(layer, f"weight {wt.name!r} is shared by {consumers[wt.name]} nodes")
    if not np.isfinite(w).all():
        return _skip(layer, "weight contains NaN or Inf")
    layer._weight = w
    in_dims = shapes.get(node.inputs[0].name)
    out_dims = shapes.get(node.outputs[0].name)

    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        if group != 1:
            kind = "depthwise" if w.shape[1] == 1 else "grouped"
            return _skip(layer, f"{kind} conv (group={group})")
        if w.ndim not in (3, 4):
            return _skip(layer, f"{w.ndim - 2}-D conv is not supported (1-D and 2-D are)")
        nsp = w.ndim - 2
        layer.spatial_rank = nsp
        strides = list(node.attrs.get("strides", [1] * nsp))
        dil = list(node.attrs.get("dilations", [1] * nsp))
        pads = list(node.attrs.get("pads", [0] * 2 * nsp))
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        ksz = list(w.shape[2:])
        if auto_pad == "VALID":
            pads = [0] * 2 * nsp
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            # The factorized convs keep auto_pad: each axis is padded from its own
            # size, and the conv that does not hold an axis has kernel 1 and stride 1
            # there, so the rewrite is exact at every input size.  The explicit pads
            # (at the analysed size, when known) only describe the layer.
            layer.auto_pad = auto_pad
            pads = [0] * 2 * nsp
            for a in range(nsp if _known(in_dims) and len(in_dims) == 2 + nsp else 0):
                size = in_dims[2 + a]
                out = -(-size // strides[a])
                total = max((out - 1) * strides[a] + (ksz[a] - 1) * dil[a] + 1 - size, 0)
                small, big = total // 2, total - total // 2
                pads[a], pads[nsp + a] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        if nsp == 1:
            strides, dil = strides + [1], dil + [1]
            pads = [pads[0], 0, pads[1], 0]
            ksz = ksz + [1]
        layer.strides, layer.dilations, layer.pads = tuple(strides), tuple(dil), tuple(pads)
        f, c = int(w.shape[0]), int(w.shape[1])
        layer.geometry = Geometry(f, c, (ksz[0], ksz[1]), _spatial(in_dims, 2, nsp), _spatial(out_dims, 2, nsp))
    elif node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return _skip(layer, "Gemm with transA=1 is not supported")
        if w.ndim != 2:
            return _skip(layer, "Gemm weight is not 2-D")
        layer.trans_b = int(node.attrs.get("transB", 0))
        layer.alpha = float(node.attrs.get("alpha", 1.0))
        layer.beta = float(node.attrs.get("beta", 1.0))
        if not np.isfinite(layer.weight4()).all():
            return _skip(layer, f"weight times alpha={layer.alpha:g} contains NaN or Inf")
        f, c = (w.shape[0], w.shape[1]) if layer.trans_b else (w.shape[1], w.shape[0])
        layer.activation_rank = 2
        rows = in_dims[0] if _known(in_dims) and len(in_dims) == 2 else None
        sp = (int(rows), 1) if rows is not None else None
        layer.geometry = Geometry(int(f), int(c), (1, 1), sp, sp)
    else:  # MatMul
        if w.ndim != 2:
            return _skip(layer, f"MatMul weight of rank {w.ndim} (a batched weight) is not supported")
        if in_dims is not None and len(in_dims) < 2:
            return _skip(layer, "MatMul on a 1-D activation is not supported")
        c, f = int(w.shape[0]), int(w.shape[1])
        layer.activation_rank = len(in_dims) if in_dims is not None else None
        tokens = int(prod(in_dims[:-1])) if _known(in_dims) else None
        sp = (tokens, 1) if tokens is not None else None
        layer.geometry = Geometry(f, c, (1, 1), sp, sp)

    g = layer.geometry
    if min(factorized_params(g, 1, s, 1) for s in layer.schemes) >= g.params:
        return _skip(layer, f"no factorization is smaller than the layer ({g.f}×{g.c}×{g.kernel[0]}×{g.kernel[1]})")
