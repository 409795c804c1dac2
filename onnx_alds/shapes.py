"""Concrete tensor shapes from one onnxruntime run, where onnx shape
inference stops.

ONNX shape inference (even with data propagation) loses the dims after a
Reshape whose target is computed at run time, e.g. ``Shape → Gather → Div →
Concat`` in an attention block; the layers after it then have no input
shape, no FLOPs and no latency subgraph.  :func:`runtime_shapes` runs the
model once on given inputs with the wanted intermediate tensors added as
graph outputs and reads their shapes off the results.  Shapes found this way
hold for those inputs only: a dynamic batch or sequence length is the one
that was fed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from .errors import ModelError, UsageError, first_line
from .io import EXTERNAL_DATA_THRESHOLD, proto_size, save_model, temp_dir
from .runtime import ort, providers_for

log = logging.getLogger(__name__)

# element types whose shapes are returned (onnxruntime's type strings)
_NUMERIC = {f"tensor({t})" for t in ("float", "float16", "double", "bfloat16", "int8", "int16", "int32", "int64",
                                     "uint8", "uint16", "uint32", "uint64")}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def serialized_with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The model's bytes with ``names`` added as untyped graph outputs
    (onnxruntime infers their types).  The outputs are added to ``model``
    for the serialization only and removed again, so no second copy of the
    weights is made besides the bytes."""
    have = {o.name for o in model.graph.output}
    n = len(model.graph.output)
    try:
        for name in names:
            if name not in have:
                model.graph.output.add().name = name
        return model.SerializeToString()
    finally:
        del model.graph.output[n:]


def runtime_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str] | None = None, *,
                   provider: str = "cpu") -> dict[str, list[int]]:
    """Shapes of tensors of the main graph when ``model`` runs on ``feeds``.

    ``names``: the tensors wanted (node outputs, graph inputs or
    initializers); None means every output of every node of the main graph.
    Only numeric tensors (float and integer types) are returned; a named
    tensor of another type (bool, string, sequence) or one the graph does not
    have is a :class:`UsageError`.  Models over 1.8 GB run from a temporary
    file with external data."""
    produced = [o for n in model.graph.node for o in n.output if o]
    inputs = {i.name for i in _graph_inputs(model)}
    init_dims = {t.name: list(t.dims) for t in model.graph.initializer}
    missing = sorted(inputs - set(feeds))
    if missing:
        raise UsageError(f"no input array given for model input {missing[0]!r}")
    extra = sorted(set(feeds) - inputs)
    if extra:
        raise UsageError(f"{extra[0]!r} is not an input of the model (inputs: {', '.join(sorted(inputs))})")
    out: dict[str, list[int]] = {}
    if names is None:
        wanted = list(dict.fromkeys(produced))
    else:
        known = set(produced)
        wanted = []
        for name in names:
            if name in feeds:
                out[name] = list(np.shape(feeds[name]))
            elif name in init_dims:
                out[name] = init_dims[name]
            elif name in known:
                wanted.append(name)
            else:
                raise UsageError(f"tensor {name!r} is not produced by a node of the main graph "
                                 f"(nor is it an input or initializer)")
        wanted = list(dict.fromkeys(wanted))
    if not wanted:
        return out
    rt = ort()
    so = rt.SessionOptions()
    so.log_severity_level = 4
    # no fusion: every tensor asked for is computed by the node that produces it in the file
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = providers_for(provider)
    with temp_dir("onnx-alds-shapes-") as tmp:
        if proto_size(model) > EXTERNAL_DATA_THRESHOLD:
            path = Path(tmp) / "model.onnx"
            save_model(model, path, external_data=True)  # weights to model.onnx.data, model left as it was
            shell = onnx.load(str(path), load_external_data=False)
            path.write_bytes(serialized_with_outputs(shell, wanted))
            source = str(path)
        else:
            source = serialized_with_outputs(model, wanted)
        try:
            sess = rt.InferenceSession(source, sess_options=so, providers=providers)
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load the model: {first_line(e)}") from None
        types = {o.name: o.type for o in sess.get_outputs()}
        if names is not None:
            bad = [n for n in wanted if types.get(n) not in _NUMERIC]
            if bad:
                raise UsageError(f"tensor {bad[0]!r} has type {types.get(bad[0])}, not a float or integer tensor")
        run = [n for n in wanted if types.get(n) in _NUMERIC]
        try:
            values = sess.run(run, {k: np.asarray(v) for k, v in feeds.items()})
        except Exception as e:
            raise ModelError(f"onnxruntime cannot run the model on the given inputs: {first_line(e)}") from None
    for name, v in zip(run, values):
        out[name] = [int(d) for d in np.shape(v)]
    return out


def inputs_from_shapes(model: onnx.ModelProto, input_shapes: dict[str, list] | None = None, *,
                       fill: str = "random", seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input: the model's fixed dims, and its dynamic
    dims from ``input_shapes`` (name → full shape; an entry may be None or a
    non-positive number where the model's dim is fixed).  ``fill``: "random"
    (seeded normal floats, integers 0/1 like ``validate.random_inputs``) or
    "zeros".  A dynamic dim not given is a :class:`UsageError` naming the
    input and axis."""
    if fill not in ("random", "zeros"):
        raise UsageError(f"fill must be 'random' or 'zeros', got {fill!r}")
    given = dict(input_shapes or {})
    inputs = _graph_inputs(model)
    names = {i.name for i in inputs}
    unknown = sorted(set(given) - names)
    if unknown:
        raise UsageError(f"{unknown[0]!r} is not an input of the model (inputs: {', '.join(sorted(names))})")
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in inputs:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UsageError(f"input {vi.name!r} is not a tensor, so no array can be made for it")
        shape = given.get(vi.name)
        if not t.HasField("shape"):
            if shape is None or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
                raise UsageError(f"input {vi.name!r} has no shape in the model; give its full shape "
                                 f"(--input-shape {vi.name}:D1,D2,...)")
            model_dims = [None] * len(shape)
        else:
            model_dims = [(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None))
                          for d in t.shape.dim]
        if shape is not None and len(shape) != len(model_dims):
            raise UsageError(f"input {vi.name!r} has {len(model_dims)} axes, but the shape given for it has "
                             f"{len(shape)}")
        dims = []
        for axis, d in enumerate(model_dims):
            g = shape[axis] if shape is not None else None
            g = int(g) if isinstance(g, (int, np.integer)) and g > 0 else None
            if isinstance(d, int):
                if g is not None and g != d:
                    raise UsageError(f"input {vi.name!r} has size {d} on axis {axis}, not {g} as given")
                dims.append(d)
            elif g is not None:
                dims.append(g)
            else:
                what = f" ({d})" if d else ""
                template = ",".join(str(x) if isinstance(x, int) else (x or f"D{i}") for i, x in enumerate(model_dims))
                raise UsageError(f"input {vi.name!r} has a dynamic size{what} on axis {axis}; give its full "
                                 f"shape (--input-shape {vi.name}:{template}, with numbers for the names)")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else None
        if dtype is None or np.dtype(dtype).kind not in "fiub":
            raise UsageError(f"input {vi.name!r} has element type "
                             f"{onnx.TensorProto.DataType.Name(t.elem_type)}, for which no array can be made")
        dtype = np.dtype(dtype)
        if fill == "zeros":
            feeds[vi.name] = np.zeros(dims, dtype)
        elif dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feeds[vi.name] = rng.integers(0, 2, dims).astype(dtype)
    return feeds
