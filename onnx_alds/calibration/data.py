"""Calibration data: loading and checking.

Calibration data is one array per graph input name, first axis = samples:
an ``.npz`` file, a dict of arrays, or an iterable of feed dicts (streamed,
each feed checked as it arrives).  Every problem is a ``UsageError`` of one
sentence; arrays are cast to the inputs' dtypes where that is safe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from ..errors import UsageError
from ..measure.inputs import fixed_batch, is_fixed

log = logging.getLogger(__name__)

InputSpec = Mapping[str, tuple]  # input name → (numpy dtype, dims: ints, or str/None when dynamic)

MAX_CALIBRATION_BYTES = 2 << 30  # all arrays of a calibration file, as their headers declare them
MAX_CALIBRATION_SAMPLES = 4096  # samples used from a file or dict; more add time, not accuracy


class ModelInputs(dict):
    """name → (dtype, dims) of the fed inputs, and ``limits``: name → the row
    count of the table a Gather on that input indexes (token ids must stay below it)."""

    limits: dict[str, int]


def gather_limits(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input → rows of the constant table that a Gather (axis 0) indexes with it."""
    tables = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims)}
    out: dict[str, int] = {}
    for n in model.graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and len(n.input) == 2 and axis == 0 and n.input[0] in tables:
            out[n.input[1]] = min(out.get(n.input[1], tables[n.input[0]]), tables[n.input[0]])
    return out


def model_inputs(model: onnx.ModelProto) -> ModelInputs:
    """The graph inputs that are fed (not initializers): name → (dtype, dims)."""
    inits = {t.name for t in model.graph.initializer}
    out = ModelInputs()
    out.limits = gather_limits(model)
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
    if arr.dtype.kind in "iu" and np.dtype(dtype).kind in "iu" and arr.size:
        lo, hi, info = int(arr.min()), int(arr.max()), np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            raise UsageError(f"{where} holds {hi if hi > info.max else lo}, outside the {np.dtype(dtype)} range of "
                             f"input {name!r} (it would wrap around)")
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
    batch = fixed_batch(dims[0] for _, dims in inputs.values() if dims)
    for k, (_, dims) in inputs.items():  # a first axis the model fixes while its batch is free is no samples axis
        if batch is None and dims and is_fixed(dims[0]) and len(arrays[k]) != dims[0]:
            free = next((n for n, (_, d) in inputs.items() if d and not is_fixed(d[0])), None)
            beside = f"beside input {free!r}, whose batch is dynamic" if free else "beside inputs that fix other sizes"
            raise UsageError(f"input {k!r} fixes its first axis at {dims[0]} ({_dims_text(dims)}) {beside}, so its "
                             f"array in {what} cannot count samples on that axis (it has {len(arrays[k])}); "
                             f"calibration data feeds models whose inputs all take the samples on their first axis")
    for k, rows in getattr(inputs, "limits", {}).items():
        a = arrays.get(k)
        if a is not None and a.dtype.kind in "iu" and a.size and (int(a.max()) >= rows or int(a.min()) < -rows):
            bad = int(a.max()) if int(a.max()) >= rows else int(a.min())
            raise UsageError(f"array {k!r} of {what} holds the index {bad}, but the table it indexes (a Gather) "
                             f"has {rows} rows (ids from {-rows} to {rows - 1})")
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
        _check_declared_sizes(data, path)
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


def npy_header(data: np.lib.npyio.NpzFile, member) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype that ``member`` (a name or ZipInfo) of an open ``.npz``
    declares in its .npy header, read without reading the array; any exception
    means the member is no .npy file."""
    with data.zip.open(member) as m:
        version = np.lib.format.read_magic(m)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)(m)
    return shape, dtype


def _check_declared_sizes(data, path: Path) -> None:
    """Refuse an archive whose arrays declare more than MAX_CALIBRATION_BYTES,
    from the zip and .npy headers, before any array is read."""
    total = 0
    for info in data.zip.infolist():
        try:
            shape, dtype = npy_header(data, info)
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        except Exception:  # noqa: BLE001 - not an .npy member: reading it reports the problem
            declared = 0
        total += max(declared, info.file_size)
    if total > MAX_CALIBRATION_BYTES:
        raise UsageError(f"calibration file {str(path)!r} declares {total / 2**30:.2f} GiB of arrays, over the "
                         f"{MAX_CALIBRATION_BYTES >> 30} GiB limit (refused before reading); give at most "
                         f"{MAX_CALIBRATION_SAMPLES} samples")


class CalibrationStream:
    """Calibration feeds from an iterable of feed dicts (or a callable that
    returns one), each checked as it arrives.  Iterating it yields checked
    feeds; a plain iterator (a generator) can be read only once."""

    def __init__(self, source: Iterable[Mapping] | Callable[[], Iterable[Mapping]], inputs: InputSpec):
        self._source = source
        self.inputs = inputs if isinstance(inputs, ModelInputs) else dict(inputs)
        self.reiterable = callable(source) or iter(source) is not source
        self.samples: int | None = None  # known after one complete pass
        self._passes = 0
        self._first: dict[str, np.ndarray] | None = None
        self._resume = None  # (first feed, the rest) of an iterator that first() began
        self._capped = False  # the sample cap was met and said

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
            n = _samples(arrays)
            if total + n > MAX_CALIBRATION_SAMPLES:  # as a file's: more add time, not accuracy
                if not self._capped:
                    self._capped = True
                    log.warning("the calibration feeds hold more than %d samples; the first %d are used",
                                MAX_CALIBRATION_SAMPLES, MAX_CALIBRATION_SAMPLES)
                keep = MAX_CALIBRATION_SAMPLES - total
                arrays = {k: a[:keep] if np.ndim(a) else a for k, a in arrays.items()}
                total += keep
                if keep:
                    yield arrays
                break
            total += n
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
    n = max((len(a) for a in arrays.values() if np.ndim(a)), default=0)
    if n > MAX_CALIBRATION_SAMPLES:
        log.warning("%s holds %d samples; the first %d are used", what, n, MAX_CALIBRATION_SAMPLES)
        arrays = {k: a[:MAX_CALIBRATION_SAMPLES] if np.ndim(a) else a for k, a in arrays.items()}
    return _check_feed(arrays, inputs, what)


def check_input_shapes(input_shapes: dict | None, feeds: dict | None, what: str = "the calibration data") -> None:
    """``--input-shape`` and the given data must agree (beyond the batch axis): the shapes fix FLOPs,
    validation and latency, the data what is fitted and compared; silently ignoring one would be wrong."""
    for name, dims in (input_shapes or {}).items():
        got = feeds.get(name) if feeds else None
        if got is not None and (len(got.shape) != len(dims) or list(got.shape[1:]) != list(dims[1:])):
            raise UsageError(f"--input-shape {name}:{','.join(map(str, dims))} disagrees with {what}'s "
                             f"{name}, whose samples are {list(got.shape[1:])}")


def load_checked(source, model: onnx.ModelProto, input_shapes: dict | None = None,
                 what: str = "the calibration data") -> dict[str, np.ndarray] | CalibrationStream:
    """:func:`load_calibration` for ``model``'s inputs, checked against ``--input-shape``
    (:func:`check_input_shapes`; a stream by its first feed)."""
    data = load_calibration(source, model_inputs(model))
    check_input_shapes(input_shapes, data if isinstance(data, dict) else data.first(), what)
    return data


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
