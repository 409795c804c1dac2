"""Second moments of each layer's unfolded input patches on calibration data.

For a layer with weight matrix ``Wm = W.reshape(f, d)`` (scheme s0, ``d = c·κ1·κ2``)
and the patches ``x`` it multiplies (one per output position, the columns of X),
the data-aware error of DESIGN.md ("The math" 6) needs only

    G = Σ_patches x xᵀ  (d × d),   since   ‖(W − Ŵ) X‖_F² = tr(E G Eᵀ),  E = Wm − Ŵm,

and ``Σ x`` for the mean output shift (bias correction).  A Conv patch is the
input window of one output position, zero-padded, with the Conv's strides and
dilations, flattened in the order (channel, kernel row, kernel col), so that
the conv output there is ``Wm @ x`` and channel group i of k owns the columns
``[i·d/k, (i+1)·d/k)``.  A Gemm/MatMul patch is one row of its input reshaped
to ``(-1, c)``.

The capture adds every tap's input tensor as a graph output, runs
onnxruntime batch by batch and adds each batch's patches to G in float64, so
memory does not grow with the number of samples.  When the captured
activations of one batch would exceed ``max_bytes``, the taps are split into
groups, one pass over the data (and one session) per group.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import onnx

from .errors import UsageError
from .io import EXTERNAL_DATA_THRESHOLD, proto_size, save_model, temp_dir
from .runtime import providers_for, session, used_provider

log = logging.getLogger(__name__)

# rows of float64 patches per chunk: no temporary of the accumulation exceeds this
CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class Tap:
    """What the capture needs to know of one layer."""

    name: str  # layer name (key of the result)
    input: str  # name of the tensor that is the layer's activation input in the graph
    kind: str  # "conv" or "linear"
    kernel: tuple[int, int] = (1, 1)  # κ1, κ2 (a 1-D conv has κ2 = 1)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # (begin1, begin2, end1, end2)
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER: pads are computed from the actual input size
    spatial_rank: int = 2  # 1 or 2 for conv (input N×C×L or N×C×H×W), 0 for linear
    channels: int = 0  # c (input channels / in_features)

    @property
    def d(self) -> int:
        """Length of one patch (0 while ``channels`` is unknown)."""
        return self.channels * self.kernel[0] * self.kernel[1] if self.kind == "conv" else self.channels


def tap_for_layer(layer) -> Tap:
    """The tap of an extracted layer (``onnx_alds.extract.Layer``, read by its
    fields only: extract's pads, strides and dilations are already in the
    2-axis form a Tap uses)."""
    g, a = layer.geometry, layer.attrs
    common = dict(name=layer.name, input=layer.input_name, channels=int(g.c))
    if a.spatial_rank:
        return Tap(kind="conv", kernel=tuple(g.kernel), strides=tuple(a.strides),
                   dilations=tuple(a.dilations), pads=tuple(a.pads), auto_pad=a.auto_pad,
                   spatial_rank=a.spatial_rank, **common)
    return Tap(kind="linear", spatial_rank=0, **common)


def taps_for(layers) -> list[Tap]:
    """Taps of the layers whose specs take data-aware errors."""
    return [tap_for_layer(l) for l in layers if l.spec.data_aware]


@dataclass
class Moments:
    gram: np.ndarray  # (d, d) float64: Σ over all patches of x xᵀ
    sum: np.ndarray  # (d,) float64: Σ x
    count: int  # number of patches (rows)

    @classmethod
    def zeros(cls, d: int) -> Moments:
        return cls(np.zeros((d, d)), np.zeros(d), 0)

    @property
    def d(self) -> int:
        return len(self.sum)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def covariance(self, centered: bool = True) -> np.ndarray:
        """``gram/count − mean meanᵀ`` (or ``gram/count`` when not centered)."""
        second = self.gram / max(self.count, 1)
        if not centered:
            return second
        m = self.mean
        return second - np.outer(m, m)

    def add(self, patches: np.ndarray) -> None:
        """Add the rows of ``patches`` (rows × d) in place."""
        x = np.asarray(patches, dtype=np.float64)
        self.gram += x.T @ x  # numpy takes x.T @ x to BLAS syrk
        self.sum += x.sum(axis=0)
        self.count += len(x)

    def merge(self, other: Moments) -> Moments:
        if other.d != self.d:
            raise ValueError(f"cannot merge moments of patch length {self.d} and {other.d}")
        return Moments(self.gram + other.gram, self.sum + other.sum, self.count + other.count)


# ----------------------------------------------------------------------------- calibration data

InputSpec = Mapping[str, tuple]  # input name → (numpy dtype, dims: ints, or str/None when dynamic)


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list]]:
    """The graph inputs that are fed (not initializers): name → (dtype, dims)."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else np.dtype(np.float32)
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
            if t.HasField("shape") else None
        out[inp.name] = (np.dtype(dtype), dims)
    return out


def _dims_text(dims) -> str:
    return "×".join(str(d) if isinstance(d, int) else (d or "?") for d in dims)


def _check_array(name: str, value, spec, where: str) -> np.ndarray:
    """``value`` as an array of the input's dtype, or UsageError naming ``where``."""
    dtype, dims = spec
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise UsageError(f"{where} is not a numeric array") from None
    if arr.dtype == object:
        raise UsageError(f"{where} holds Python objects, not numbers")
    if arr.dtype.kind not in "biuf" or not np.can_cast(arr.dtype, dtype, "same_kind"):
        raise UsageError(f"{where} has dtype {arr.dtype}, which cannot be cast safely to the "
                         f"{np.dtype(dtype)} of input {name!r}")
    if arr.ndim == 0:
        raise UsageError(f"{where} is a scalar, but its first axis must count the samples")
    if dims is not None:
        if arr.ndim != len(dims):
            raise UsageError(f"{where} has shape {tuple(arr.shape)}, but input {name!r} has rank {len(dims)} "
                             f"({_dims_text(dims)}, first axis = samples)")
        for axis in range(1, len(dims)):
            if isinstance(dims[axis], int) and dims[axis] > 0 and arr.shape[axis] != dims[axis]:
                raise UsageError(f"{where} has size {arr.shape[axis]} on axis {axis}, but input {name!r} "
                                 f"needs {dims[axis]} there ({_dims_text(dims)})")
    if len(arr) == 0:
        raise UsageError(f"{where} has no samples")
    if arr.dtype != dtype:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(dtype)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UsageError(f"{where} contains NaN or Inf" + (" (after the cast to float32)" if np.isfinite(
            np.asarray(value)).all() else ""))
    return np.ascontiguousarray(arr)


def _check_feed(feed: Mapping, inputs: InputSpec, what: str) -> dict[str, np.ndarray]:
    """Every input present, none unknown, all with the same number of samples."""
    unknown = [k for k in feed if k not in inputs]
    if unknown:
        raise UsageError(f"{what} has an array {unknown[0]!r}, which is not an input of the model "
                         f"(its inputs are {', '.join(map(repr, inputs))})")
    missing = [k for k in inputs if k not in feed]
    if missing:
        raise UsageError(f"{what} has no array for input {missing[0]!r}")
    arrays = {k: _check_array(k, feed[k], inputs[k], f"array {k!r} of {what}") for k in inputs}
    counts = {k: len(a) for k, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise UsageError(f"the arrays of {what} have different numbers of samples ("
                         + ", ".join(f"{k}: {n}" for k, n in counts.items()) + ")")
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise UsageError(f"calibration file {str(path)!r} does not exist")
    if not path.is_file():
        raise UsageError(f"calibration file {str(path)!r} is not a file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # np.load raises assorted errors on a file that is not a .npy/.npz
        raise UsageError(f"calibration file {str(path)!r} could not be read as an .npz archive "
                         f"({type(e).__name__})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UsageError(f"calibration file {str(path)!r} is a single .npy array, not an .npz archive "
                         "of one array per input name")
    out = {}
    with data:
        for key in data.files:
            try:
                out[key] = data[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise UsageError(f"array {key!r} of calibration file {str(path)!r} holds pickled Python "
                                     "objects, which are not loaded; save numeric arrays") from None
                raise UsageError(f"array {key!r} of calibration file {str(path)!r} could not be read") from None
            except Exception:
                raise UsageError(f"array {key!r} of calibration file {str(path)!r} could not be read") from None
    return out


class CalibrationStream:
    """Calibration feeds from an iterable of feed dicts (or a callable that
    returns one), each checked as it arrives.  Iterating it yields checked
    feeds; a plain iterator (a generator) can be read only once."""

    def __init__(self, source: Iterable[Mapping] | Callable[[], Iterable[Mapping]], inputs: InputSpec):
        self._source = source
        self.inputs = dict(inputs)
        self.reiterable = callable(source) or iter(source) is not source
        self.samples: int | None = None  # known after one complete pass
        self._passes = 0
        self._first: dict[str, np.ndarray] | None = None
        self._resume = None  # (first feed, the rest) of an iterator that first() began

    def first(self) -> dict[str, np.ndarray]:
        """The first checked feed (an iterator's next pass starts with it again)."""
        if self._first is None:
            it = iter(self)
            self._first = next(it)  # an empty source raises "no samples" here
            if not self.reiterable:
                self._resume = (self._first, it)
        return self._first

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._resume is not None:
            first, rest = self._resume
            self._resume = None
            yield first
            yield from rest
            return
        if self._passes and not self.reiterable:
            raise UsageError("the calibration feeds come from an iterator, which can be read only once")
        self._passes += 1
        feeds = self._source() if callable(self._source) else self._source
        total = 0
        for i, feed in enumerate(feeds):
            what = f"calibration feed {i}"
            if not isinstance(feed, Mapping):
                raise UsageError(f"{what} is a {type(feed).__name__}, not a dict of input name to array")
            arrays = _check_feed(feed, self.inputs, what)
            total += _samples(arrays)
            yield arrays
        if total == 0:
            raise UsageError("the calibration feeds hold no samples")
        self.samples = total


def load_calibration(source, inputs: InputSpec) -> dict[str, np.ndarray] | CalibrationStream:
    """Checked calibration data for a model with ``inputs`` (see ``model_inputs``).

    ``source`` is a path to an ``.npz`` (one array per graph input name, first
    axis = samples), a dict name → array, or an iterable of feed dicts (or a
    callable returning one), which is streamed: the result is then a
    ``CalibrationStream`` that checks each feed as it comes.  Arrays are cast
    to the input dtypes where that is safe (float64 → float32 is).  Every
    problem is a ``UsageError`` of one sentence."""
    if isinstance(source, CalibrationStream):
        return source if source.inputs == dict(inputs) else CalibrationStream(source._source, inputs)
    if isinstance(source, (str, os.PathLike)):
        arrays, what = _read_npz(Path(source)), f"calibration file {str(source)!r}"
    elif isinstance(source, Mapping):
        arrays, what = source, "the calibration data"
    elif callable(source) or isinstance(source, Iterable):
        return CalibrationStream(source, inputs)
    else:
        raise UsageError(f"calibration data of type {type(source).__name__} is neither an .npz path, "
                         "a dict of arrays nor an iterable of feeds")
    return _check_feed(arrays, inputs, what)


def _samples(feed: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(feed.values()))) if feed else 0


def first_samples(calibration, n: int | None = None) -> dict[str, np.ndarray]:
    """The first ``n`` samples (all with None) of checked calibration data as
    one dict of arrays; a stream is read only as far as needed."""
    if isinstance(calibration, dict):
        return {k: v[:n] for k, v in calibration.items()}
    parts, got = [], 0
    for b in iter_batches(calibration, 64):
        parts.append(b)
        got += _samples(b)
        if n is not None and got >= n:
            break
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]} if parts else {}


def iter_batches(calibration, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of ``batch_size`` samples (the last one may be smaller), from a
    dict of arrays (slices, no copies) or a stream (re-batched, holding at
    most one batch plus one feed)."""
    if batch_size < 1:
        raise UsageError(f"the batch size must be at least 1, not {batch_size}")
    if isinstance(calibration, Mapping):
        n = _samples(calibration)
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in calibration.items()}
        return
    buf: list[dict[str, np.ndarray]] = []
    have = 0
    for feed in calibration:
        n = _samples(feed)
        if n == 0:
            continue
        buf.append(feed)
        have += n
        while have >= batch_size:
            joined = buf[0] if len(buf) == 1 else {k: np.concatenate([f[k] for f in buf]) for k in buf[0]}
            yield {k: v[:batch_size] for k, v in joined.items()}
            have -= batch_size
            buf = [{k: v[batch_size:] for k, v in joined.items()}] if have else []
    if have:
        yield buf[0] if len(buf) == 1 else {k: np.concatenate([f[k] for f in buf]) for k in buf[0]}


# ----------------------------------------------------------------------------- patches

def conv_pads(tap: Tap, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(begin1, begin2, end1, end2) for an input of spatial ``size`` (auto_pad as in ONNX Conv)."""
    if tap.auto_pad == "VALID":
        return (0, 0, 0, 0)
    if tap.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(tap.pads)
    begin, end = [], []
    for a in range(2):
        k, s, dil = tap.kernel[a], tap.strides[a], tap.dilations[a]
        out = -(-size[a] // s)
        total = max((out - 1) * s + (k - 1) * dil + 1 - size[a], 0)
        small, big = total // 2, total - total // 2
        b, e = (small, big) if tap.auto_pad == "SAME_UPPER" else (big, small)
        begin.append(b)
        end.append(e)
    return (begin[0], begin[1], end[0], end[1])


def iter_patches(x: np.ndarray, tap: Tap, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The patches of activation ``x`` as float64 row blocks (rows × d), each at
    most ``chunk_bytes`` (or one output line); rows in the order of the output
    positions (sample, then output row, then output col)."""
    if tap.kind == "linear":
        c = x.shape[-1]
        if tap.channels and c != tap.channels:
            raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has {c} features, not {tap.channels}")
        rows = x.reshape(-1, c)
        step = max(1, chunk_bytes // (8 * c))
        for i in range(0, len(rows), step):
            yield rows[i : i + step].astype(np.float64)
        return
    if tap.kind != "conv":
        raise ValueError(f"tap {tap.name!r} has kind {tap.kind!r} (conv or linear)")
    if x.ndim != 2 + tap.spatial_rank:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has rank {x.ndim}, "
                         f"not {2 + tap.spatial_rank} for a {tap.spatial_rank}-D conv")
    if tap.spatial_rank == 1:
        x = x[..., None]
    n, c, h, w = x.shape
    if tap.channels and c != tap.channels:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has {c} channels, not {tap.channels}")
    (k1, k2), (s1, s2), (d1, d2) = tap.kernel, tap.strides, tap.dilations
    b1, b2, e1, e2 = conv_pads(tap, (h, w))
    span1, span2 = (k1 - 1) * d1 + 1, (k2 - 1) * d2 + 1
    ho, wo = (h + b1 + e1 - span1) // s1 + 1, (w + b2 + e2 - span2) // s2 + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"tap {tap.name!r}: input {h}×{w} is smaller than the padded kernel")
    d = c * k1 * k2
    max_rows = max(1, chunk_bytes // (8 * d))
    if ho * wo <= max_rows:  # several samples per chunk
        samples, lines = max_rows // (ho * wo), ho
    else:  # one sample, a few output lines per chunk
        samples, lines = 1, max(1, max_rows // wo)
    for i in range(0, n, samples):
        xp = x[i : i + samples]
        if b1 or b2 or e1 or e2:
            xp = np.pad(xp, ((0, 0), (0, 0), (b1, e1), (b2, e2)))
        # (n', c, ho, wo, κ1, κ2), a view: window (p, q) of output (i, j) starts at (i·s1, j·s2)
        win = np.lib.stride_tricks.sliding_window_view(xp, (span1, span2), axis=(2, 3))
        win = win[:, :, ::s1, ::s2, ::d1, ::d2][:, :, :ho, :wo].transpose(0, 2, 3, 1, 4, 5)
        for r in range(0, ho, lines):
            yield np.ascontiguousarray(win[:, r : r + lines], dtype=np.float64).reshape(-1, d)


def patches(x: np.ndarray, tap: Tap) -> np.ndarray:
    """All patches of ``x`` as one float64 matrix (rows × d): conv output = patches @ Wmᵀ."""
    return np.concatenate(list(iter_patches(x, tap)), axis=0)


def accumulate(moments: Moments | None, x: np.ndarray, tap: Tap) -> Moments:
    """``moments`` (new ones when None) plus the patches of activation ``x``."""
    for block in iter_patches(x, tap):
        if moments is None:
            moments = Moments.zeros(block.shape[1])
        moments.add(block)
    if moments is not None and not np.isfinite(moments.sum).all():
        raise UsageError(f"the input of layer {tap.name!r} contains NaN or Inf on the calibration data")
    return moments


# ----------------------------------------------------------------------------- capture

def _check_taps(model: onnx.ModelProto, taps: list[Tap]) -> None:
    names = [t.name for t in taps]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two taps are named {dup!r}")
    g = model.graph
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    inits = {t.name for t in g.initializer}
    for t in taps:
        if t.kind not in ("conv", "linear"):
            raise ValueError(f"tap {t.name!r} has kind {t.kind!r} (conv or linear)")
        if t.kind == "conv" and t.spatial_rank not in (1, 2):
            raise ValueError(f"tap {t.name!r} is a conv of spatial rank {t.spatial_rank} (1 or 2)")
        if t.input in inits or t.input not in produced:
            raise ValueError(f"tap {t.name!r}: {t.input!r} is not an activation of the main graph")


def _shape_model(model: onnx.ModelProto, input_shapes: dict[str, list]) -> onnx.ModelProto:
    """A copy for shape inference: inputs fixed to ``input_shapes``, large
    initializers as typed inputs (no weight is copied)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for inp in src.input:
        vi = g.input.add()
        vi.CopyFrom(inp)
        if inp.name in input_shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[inp.name]:
                shape.dim.add().dim_value = int(d)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        if prod(t.dims) <= 4096 and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _tensor_info(model: onnx.ModelProto, names: list[str], input_shapes: dict[str, list]):
    """name → (elem_type or 0, bytes at ``input_shapes`` or None) by onnx shape inference."""
    try:
        m = onnx.shape_inference.infer_shapes(_shape_model(model, input_shapes), data_prop=True)
    except Exception as e:  # best effort: unknown sizes are measured on one sample instead
        log.info("shape inference failed (%s); activation sizes are measured", e)
        m = model
    vis = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    out = {}
    for n in names:
        t = vis[n].type.tensor_type if n in vis else None
        elem = t.elem_type if t is not None else 0
        size = None
        if t is not None and elem and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
            size = itemsize * prod(d.dim_value for d in t.shape.dim)
        out[n] = (elem, size)
    return out


@dataclass
class Pass:
    """One run over the calibration data: the tensors it captures, at a batch size."""

    tensors: list[str]
    batch_size: int
    bytes: int  # estimated bytes of the captured activations of one batch


def plan_passes(sizes: dict[str, int], batch_size: int, max_bytes: int, *,
                fixed_batch: bool = False) -> list[Pass]:
    """Group tensors (name → bytes of one batch of ``batch_size``) into passes
    of at most ``max_bytes`` each, in order.  A tensor larger than the budget
    on its own gets a pass at a smaller batch (unless the batch is fixed)."""
    passes: list[Pass] = []
    current = Pass([], batch_size, 0)
    for name, size in sizes.items():
        if size > max_bytes:
            b = batch_size if fixed_batch else max(1, batch_size * max_bytes // size)
            if size * b // batch_size > max_bytes:
                log.warning("activation %r takes %.1f MiB at batch %d, over max_bytes=%d", name,
                            size * b / batch_size / 2**20, b, max_bytes)
            passes.append(Pass([name], b, size * b // batch_size))
            continue
        if current.tensors and current.bytes + size > max_bytes:
            passes.append(current)
            current = Pass([], batch_size, 0)
        current.tensors.append(name)
        current.bytes += size
    if current.tensors:
        passes.append(current)
    return passes


class _Capture:
    """Sessions on the model with chosen tensors as extra outputs.  Models over
    the protobuf limit go to a temporary directory once, with external data;
    each pass then writes only a small graph file beside that data."""

    def __init__(self, model: onnx.ModelProto, providers, threads, elem_types: dict[str, int], tmp: Path):
        self.providers, self.threads, self.elem_types = providers, threads, elem_types
        self.large = proto_size(model) > EXTERNAL_DATA_THRESHOLD
        if self.large:
            self.path = tmp / "model.onnx"
            save_model(model, self.path, external_data=True)
            self.base = onnx.load(str(self.path), load_external_data=False)
        else:
            self.base = onnx.ModelProto()
            self.base.CopyFrom(model)
        self.n_outputs = len(self.base.graph.output)
        self.existing = {o.name for o in self.base.graph.output}

    def session(self, tensors: list[str]):
        g = self.base.graph
        del g.output[self.n_outputs :]
        for name in tensors:
            if name in self.existing:
                continue
            vi = g.output.add()
            vi.name = name
            if self.elem_types.get(name):  # onnxruntime takes an output without a type as well
                vi.type.tensor_type.elem_type = self.elem_types[name]
        if self.large:
            onnx.save_model(self.base, str(self.path))  # the graph only; the weights stay in model.onnx.data
            return session(str(self.path), self.providers, self.threads, low_memory=True)
        return session(self.base, self.providers, self.threads)


def _fixed_batch(inputs: InputSpec) -> int | None:
    sizes = {dims[0] for _, dims in inputs.values() if dims and isinstance(dims[0], int) and dims[0] > 0}
    return sizes.pop() if len(sizes) == 1 else None


def collect_moments(model, taps: list[Tap], calibration, *, batch_size: int = 16, provider: str = "auto",
                    threads: int | None = None, max_bytes: int = 2 << 30,
                    progress: bool = False) -> dict[str, Moments]:
    """Moments of every tap's patches over all calibration samples.

    ``model`` is a ModelProto or a path; ``calibration`` anything
    ``load_calibration`` takes.  The activations captured in one batch stay
    under ``max_bytes`` (as estimated by shape inference, or measured on one
    sample where it cannot tell): taps are split into several passes over the
    data when they do not fit together, and a single activation over the budget
    is captured at a smaller batch.  ``threads`` bounds onnxruntime's and BLAS's
    threads."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    _check_taps(model, taps)
    if not taps:
        return {}
    inputs = model_inputs(model)
    calibration = load_calibration(calibration, inputs)
    fixed = _fixed_batch(inputs)
    if fixed is not None and fixed != batch_size:
        log.info("the model's batch size is fixed at %d; calibrating in batches of %d", fixed, fixed)
        batch_size = fixed
    first = calibration.first() if isinstance(calibration, CalibrationStream) else calibration
    one = {k: v[: fixed or 1] for k, v in first.items()}  # one batch-1 feed, for shapes and measurements
    if _samples(one) < (fixed or 1):
        raise UsageError(f"the model's batch size is fixed at {fixed}, but the first calibration feed holds "
                         f"only {_samples(one)} samples")

    graph_inputs = set(inputs)
    captured = list(dict.fromkeys(t.input for t in taps if t.input not in graph_inputs))
    info = _tensor_info(model, captured, {k: [batch_size, *v.shape[1:]] for k, v in first.items()})
    elem_types = {n: e for n, (e, _) in info.items()}
    sizes = {n: s for n, (_, s) in info.items()}
    providers = providers_for(provider)
    result: dict[str, Moments | None] = {t.name: None for t in taps}
    limits = threadpool_limits(threads) if threads else contextlib.nullcontext()
    with temp_dir("onnx-alds-calib-") as tmp, limits:
        capture = _Capture(model, providers, threads, elem_types, Path(tmp)) if captured else None
        unknown = [n for n in captured if sizes[n] is None]
        if unknown:  # shape inference could not tell: measure on one sample, scale to the batch
            for n, a in zip(unknown, capture.session(unknown).run(unknown, one)):
                sizes[n] = a.nbytes * batch_size // _samples(one)
                elem_types[n] = elem_types[n] or onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
        passes = plan_passes(sizes, batch_size, max_bytes, fixed_batch=fixed is not None)
        input_taps = [t for t in taps if t.input in graph_inputs]
        if not passes:
            passes = [Pass([], batch_size, 0)]
        if fixed is not None:
            for p in passes:
                p.batch_size = fixed
        if len(passes) > 1 and isinstance(calibration, CalibrationStream) and not calibration.reiterable:
            raise UsageError(f"the taps need {len(passes)} passes over the calibration data within max_bytes="
                             f"{max_bytes}, but its feeds come from an iterator that can be read only once")
        log.info("capturing %d taps (%d activations) in %d pass(es) of at most %.1f MiB",
                 len(taps), len(captured), len(passes), max(p.bytes for p in passes) / 2**20)
        total = calibration.samples if isinstance(calibration, CalibrationStream) else _samples(calibration)
        with tqdm(total=total * len(passes) if total else None, unit="sample", desc="calibration",
                  disable=not progress) as bar:
            for i, p in enumerate(passes):
                wanted = set(p.tensors)
                pass_taps = [t for t in taps if t.input in wanted] + (input_taps if i == 0 else [])
                log.debug("pass %d of %d: %d activations (%.1f MiB) at batch %d", i + 1, len(passes),
                          len(p.tensors), p.bytes / 2**20, p.batch_size)
                sess = capture.session(p.tensors) if p.tensors else None
                if sess is not None and i == 0:
                    log.info("calibration runs on %s", used_provider(sess))
                seen = 0
                for feed in iter_batches(calibration, p.batch_size):
                    n = _samples(feed)
                    if fixed is not None and n < fixed:
                        log.warning("the last %d calibration samples are left out: the model's batch size "
                                    "is fixed at %d", n, fixed)
                        break
                    acts = dict(zip(p.tensors, sess.run(p.tensors, feed))) if sess is not None else {}
                    acts.update(feed)
                    for t in pass_taps:
                        result[t.name] = accumulate(result[t.name], acts[t.input], t)
                    del acts
                    seen += n
                    bar.update(n)
                del sess
                if i == 0 and total is None:
                    bar.total = seen * len(passes)
                    bar.refresh()
    empty = [name for name, m in result.items() if m is None]
    if empty:
        raise UsageError(f"the model's batch size is fixed at {fixed}, but the calibration data holds fewer "
                         "samples than that")
    return result
