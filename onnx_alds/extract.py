"""Find the compressible layers of a graph, with their shapes, params and FLOPs.

A layer is a node whose op has a spec in :mod:`onnx_alds.ops` (Conv with
``group=1``, Gemm with ``transA=0``, MatMul with a constant 2-D weight) and
that its spec accepts.  Its weight is viewed as ``f × c × κ1 × κ2`` (outputs ×
inputs × kernel; a linear layer has a 1×1 kernel), whatever its stored
orientation.  Every other Conv/Gemm/MatMul, and every ConvTranspose, is listed
with the reason it is left alone.  Shapes come from ONNX shape inference with
the model's inputs fixed (a dynamic batch counts as 1; other dynamic sizes
come from ``input_shapes``).

The analysis is immutable: :class:`Layer` and :class:`ModelInfo` are frozen,
and the weights stay in the graph (:class:`onnx_alds.io.Source` reads them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from math import prod

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .argtypes import check_names
from .cost import Geometry, factorized_params
from .errors import UsageError
from .io import copy_model_fields, values_not_kept
from .ops import SPECS, LayerAttrs, constant_value, has_bias, known, spec_for
from .ops.base import FLOAT_DTYPES

log = logging.getLogger(__name__)

LAYER_OPS = tuple(SPECS)


@dataclass(frozen=True)
class Layer:
    name: str
    op: str
    node_index: int = -1  # position of the node in the main graph (-1: inside a subgraph)
    weight_name: str = ""
    input_name: str = ""  # the activation input
    weight_shape: tuple[int, ...] = ()
    dtype: str = ""
    status: str = "candidate"  # candidate | skipped
    reason: str | None = None
    geometry: Geometry | None = None
    params: int = 0  # weight elements
    bias_params: int = 0
    has_bias: bool = False
    bias_constant: bool = True  # absent or constant: a bias correction can be folded in
    flops: int | None = None
    attrs: LayerAttrs = field(default_factory=LayerAttrs)

    @property
    def spec(self):
        return spec_for(self.op)

    @property
    def schemes(self) -> tuple[str, ...]:
        return self.spec.schemes(self.geometry.kernel) if self.geometry else ()

    @property
    def allow_groups(self) -> bool:
        """Whether k > 1 can be emitted (a grouped linear needs its activation rank)."""
        return self.spec.allow_groups(self.attrs)


@dataclass(frozen=True)
class ModelInfo:
    layers: tuple[Layer, ...]
    params_total: int
    flops_total: int | None
    input_shapes: dict[str, list]
    shapes: dict[str, list] = field(repr=False, default_factory=dict)
    opset: int = 0

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
        if not out[name] or min(out[name]) < 1:
            raise UsageError(f"--input-shape {name!r}: every dimension must be a positive integer, got "
                             f"{','.join(str(d) for d in out[name]) or 'none'}")
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
    check_names("--input-shape", sorted(given), out, "input")  # the ones left named no input
    return out


def _weightless_copy(model: onnx.ModelProto, max_elements: int = 4096) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference in which large initializers are
    typed graph inputs instead of data, so no weight is copied."""
    m = onnx.ModelProto()
    copy_model_fields(model, m)
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

def _node_flops(node: gs.Node, shapes) -> int | None:
    """MACs of any node a spec knows (also the ones we do not compress)."""
    return spec_for(node.op).node_flops(node, shapes) if node.op in SPECS else None


def model_flops(model: onnx.ModelProto, input_shapes: dict[str, list]) -> int | None:
    """MACs of every Conv/Gemm/MatMul of ``model`` at ``input_shapes`` (None when a size is unknown)."""
    shapes = infer_shapes(model, input_shapes)
    total = 0
    for node in gs.import_onnx(model).nodes:
        if node.op in LAYER_OPS:
            nf = _node_flops(node, shapes)
            if nf is None:
                return None
            total += nf
    return total


def _fill_from_runtime(model, graph, fixed: dict, shapes: dict) -> None:
    """Where onnx shape inference stops (a Reshape to a shape computed at run
    time, say), take the shapes onnxruntime sees when it runs the model at
    the fixed input shapes.  Only when every input size is known."""
    wanted = sorted({t.name for n in graph.nodes if n.op in LAYER_OPS
                     for t in (n.inputs[:1] + n.outputs[:1]) if not known(shapes.get(t.name))})
    if not wanted or not all(known(d) for d in fixed.values()):
        return
    try:
        from .shapes import inputs_from_shapes, runtime_shapes

        got = runtime_shapes(model, inputs_from_shapes(model, fixed, fill="zeros"), wanted)
    except Exception as e:  # best effort: without them the layers lack FLOPs, as before
        log.info("no shapes from onnxruntime (%s)", e)
        return
    shapes.update({k: list(v) for k, v in got.items()})


def _consumers(graph: gs.Graph) -> dict[str, int]:
    consumers: dict[str, int] = {}
    for node in graph.nodes:
        # a weight read inside an If/Loop/Scan body counts as shared too
        for n in [node] + [sn for sg in node.subgraphs(recursive=True) for sn in sg.nodes]:
            for t in n.inputs:
                consumers[t.name] = consumers.get(t.name, 0) + 1
    return consumers


def _describe(w) -> dict:
    if w is None:
        return {}
    w = np.asarray(w)
    return dict(weight_shape=tuple(int(d) for d in w.shape), dtype=str(w.dtype), params=int(w.size))


def _bias_params(node: gs.Node) -> int:
    if not (node.op in SPECS and spec_for(node.op).bias_input) or not has_bias(node):
        return 0
    bv = constant_value(node.inputs[2])
    return int(np.asarray(bv).size) if bv is not None else 0


def _analyse(node: gs.Node, index: int, name: str, shapes, consumers, opset: int, interface: dict) -> Layer:
    """One main-graph node → its Layer (a candidate, or skipped with the reason)."""
    wt = node.inputs[1]
    w = constant_value(wt)
    base = dict(name=name, op=node.op, node_index=index, weight_name=wt.name, input_name=node.inputs[0].name,
                bias_params=_bias_params(node), has_bias=has_bias(node) and node.op in SPECS and spec_for(node.op).bias_input,
                **_describe(w))

    def skip(reason):
        return Layer(status="skipped", reason=reason, **base)

    if node.op == "MatMul" and constant_value(node.inputs[0]) is not None and w is None:
        return skip("the constant operand is the first input of MatMul")
    if w is None:
        return skip("weight is computed at run time")
    w = np.asarray(w)
    if w.dtype not in FLOAT_DTYPES:
        if "float" in str(w.dtype):  # bfloat16, float8 (ml_dtypes)
            return skip(f"weight dtype {w.dtype} is not supported (float16, float32 and float64 are)")
        return skip(f"weight dtype {w.dtype} is not a floating-point type")
    if consumers.get(wt.name, 0) > 1:
        return skip(f"weight {wt.name!r} is shared by {consumers[wt.name]} nodes")
    if wt.name in interface.get("outputs", ()):
        return skip(f"weight {wt.name!r} is also a graph output")
    if wt.name in interface.get("inputs", ()):
        return skip(f"weight {wt.name!r} is also a graph input, so it can be replaced at run time")
    if not np.isfinite(w).all():
        return skip("weight contains NaN or Inf")
    if base["has_bias"] and constant_value(node.inputs[2]) is None:
        base["bias_constant"] = False  # stays an input of the decoder; no bias correction
    spec = spec_for(node.op)
    cl = spec.classify(node, w, shapes.get(node.inputs[0].name), shapes.get(node.outputs[0].name))
    if cl.reason is not None:
        return skip(cl.reason)
    if node.op != "Conv" and opset < 7:
        # the emitted Reshape needs opset 5, a Gemm decoder without `broadcast` opset 7
        return skip(f"linear layers need opset 7 or newer (the model has opset {opset})")
    g = cl.geometry
    if min(factorized_params(g, 1, s, 1) for s in spec.schemes(g.kernel)) >= g.params:
        return skip(f"no factorization is smaller than the layer ({g.f}×{g.c}×{g.kernel[0]}×{g.kernel[1]})")
    return Layer(geometry=g, attrs=cl.attrs, flops=g.flops, **base)


def extract(model: onnx.ModelProto, graph: gs.Graph, input_shapes: dict[str, list[int]] | None = None) -> ModelInfo:
    """Analyse ``graph`` (imported from ``model``) and list every Conv/Gemm/MatMul."""
    fixed = fixed_input_shapes(model, input_shapes)
    shapes = infer_shapes(model, fixed)
    _fill_from_runtime(model, graph, fixed, shapes)
    consumers = _consumers(graph)
    # weights that are part of the model's interface stay as they are
    inits = {t.name for t in model.graph.initializer}
    # (below IR 4 every initializer must be listed as an input: that makes none overridable by intent)
    interface = {"outputs": {o.name for o in model.graph.output},
                 "inputs": {i.name for i in model.graph.input if i.name in inits} if model.ir_version >= 4 else set()}
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

    for index, node in enumerate(graph.nodes):
        if node.op not in LAYER_OPS:
            continue
        nf = _node_flops(node, shapes) if node.op in LAYER_OPS else None
        if node.op in LAYER_OPS:
            flops_total = None if flops_total is None or nf is None else flops_total + nf
        if len(node.inputs) < 2:
            continue
        with values_not_kept(node.inputs[1:3]):  # the weights stay in the protobuf, not also on the graph
            layer = _analyse(node, index, unique(node.name or node.inputs[1].name), shapes, consumers, opset,
                             interface)
        if layer.status != "candidate" and node.op in LAYER_OPS:
            layer = replace(layer, flops=nf)  # what the layer costs where it stays as it is
        layers.append(layer)
    # layers in If/Loop/Scan bodies and local functions stay as they are, listed with the reason
    nested = [(n, f"inside the body of {node.op} node {node.name!r}: subgraphs are not rewritten")
              for node in graph.nodes for sg in node.subgraphs(recursive=True) for n in sg.nodes]
    nested += [(n, f"inside local function {fn.name!r}: functions are not rewritten")
               for fn in getattr(graph, "functions", []) for n in fn.nodes]
    for n, reason in nested:
        if n.op in LAYER_OPS:
            weight = n.inputs[1] if len(n.inputs) > 1 else None
            name = unique(n.name or (weight.name if weight is not None else n.op))
            with values_not_kept([weight] if weight is not None else []):
                w = constant_value(weight) if weight is not None else None
                described = _describe(w)
            layers.append(Layer(name=name, op=n.op, weight_name=weight.name if weight is not None else "",
                                status="skipped", reason=reason, **described))
    return ModelInfo(layers=tuple(layers), params_total=count_params(model), flops_total=flops_total,
                     input_shapes=fixed, shapes=shapes, opset=opset)
