"""Load and save ONNX models: clear errors, atomic writes, external data.

Nothing here ever writes to the input path: outputs go to a temporary file in
the destination directory that is renamed into place only when complete.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, Message
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import ModelError, UsageError, first_line
from .graph import names_read_inside, subgraph_bodies
from .ops import constant_value, has_bias

# protobuf cannot serialise a single message over 2 GiB; stay clear of it
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def trim_memory() -> None:
    """Hand freed memory back to the OS (glibc keeps large freed blocks on its
    heap otherwise, so a freed protobuf still counts in the peak).  Best effort."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def large_allocations_to_os() -> None:
    """Make glibc serve large blocks with mmap, which it returns to the OS on
    free, instead of raising its threshold after the first free (the default
    makes big weight arrays pile up on the heap).  Best effort, CLI only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def proto_size(model: onnx.ModelProto) -> int:
    """Approximate serialized size in bytes, summed over initializers and
    nodes one at a time (the whole model's ``ByteSize`` encodes a copy of it,
    and raises past protobuf's 2 GB limit)."""
    g = model.graph
    return sum(t.ByteSize() for t in g.initializer) + sum(n.ByteSize() for n in g.node) + \
        sum(f.ByteSize() for f in model.functions)


def load_model(path, *, check: bool = True) -> onnx.ModelProto:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"input file {str(p)!r} does not exist")
    if p.is_dir():
        raise ModelError(f"input path {str(p)!r} is a directory, not an ONNX file")
    if p.stat().st_size == 0:
        raise ModelError(f"input file {str(p)!r} is empty")
    if check:  # on the file: works at any size and copies no weights
        try:
            onnx.checker.check_model(str(p))
        except FileNotFoundError as e:
            missing = Path(e.filename).name if e.filename else first_line(e)
            raise ModelError(f"external data file {missing!r} of {str(p)!r} is missing") from None
        except Exception as e:
            msg = first_line(e)
            if "external" in msg.lower() and ("exist" in msg.lower() or "not found" in msg.lower()
                                               or "open" in msg.lower()):
                raise ModelError(f"external data of {str(p)!r} is missing ({msg})") from None
            if "parse" in msg.lower() or "protobuf" in msg.lower():
                raise ModelError(f"{str(p)!r} is not a valid ONNX model (protobuf parse failed)") from None
            raise ModelError(f"{str(p)!r} fails onnx.checker: {msg}") from None
    try:
        model = onnx.load(str(p))
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise ModelError(f"{str(p)!r} is not a valid ONNX model (protobuf parse failed: {first_line(e)})") from None
    except FileNotFoundError as e:
        missing = Path(e.filename).name if e.filename else first_line(e)
        raise ModelError(f"external data file {missing!r} of {str(p)!r} is missing") from None
    except OSError as e:
        raise ModelError(f"cannot read {str(p)!r}: {e.strerror or first_line(e)}") from None
    except Exception as e:  # onnx raises assorted errors on malformed external-data records
        raise ModelError(f"{str(p)!r} is not a valid ONNX model ({first_line(e)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"{str(p)!r} is not an ONNX model (it has no graph)")
    if check:
        check_strings(model, repr(str(p)))
        check_tensors(model, repr(str(p)))
    return model


# elements per byte of the packed sub-byte types whose size we check
_PACKED = {onnx.TensorProto.UINT4: 2, onnx.TensorProto.INT4: 2, onnx.TensorProto.FLOAT4E2M1: 2}
_UNCHECKED = {onnx.TensorProto.STRING, onnx.TensorProto.UINT2, onnx.TensorProto.INT2,
              onnx.TensorProto.FLOAT6E2M3, onnx.TensorProto.FLOAT6E3M2}


def _tensor_problem(t: onnx.TensorProto) -> str | None:
    """Why a tensor's data does not match its type and shape (which
    onnx.checker lets pass: unknown types, too much data), or None."""
    if t.data_type == onnx.TensorProto.UNDEFINED or t.data_type not in onnx.TensorProto.DataType.values():
        return f"has unknown data type {t.data_type}"
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in _UNCHECKED:
        return None
    n = 1
    for d in t.dims:
        n *= d
    per_byte = _PACKED.get(t.data_type)
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
    except Exception:
        return None
    complex_ = t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
    if t.HasField("raw_data"):
        have, need, unit = len(t.raw_data), -(-n // per_byte) if per_byte else n * item, "bytes"
    else:
        have, need, unit = len(getattr(t, field)), -(-n // per_byte) if per_byte else n * (1 + complex_), "values"
    if have != need:
        return (f"holds {have} {unit} of data where its shape {list(t.dims)} and type "
                f"{onnx.TensorProto.DataType.Name(t.data_type)} need {need}")
    return None


def check_tensors(model: onnx.ModelProto, what: str = "the model") -> None:
    """Initializers and Constant values, subgraphs included, hold exactly the
    data their type and shape say, and inputs, outputs and value_info have
    known element types (a ModelError otherwise)."""
    known = set(onnx.TensorProto.DataType.values())
    stack = [model.graph]
    while stack:
        g = stack.pop()
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type not in known:
                raise ModelError(f"{what} is not a valid ONNX model: {vi.name!r} has unknown element type "
                                 f"{vi.type.tensor_type.elem_type}")
            if any(not isinstance(d.dim_param, str) for d in vi.type.tensor_type.shape.dim):
                raise ModelError(f"{what} is not a valid ONNX model: a dimension name of {vi.name!r} "
                                 f"is not valid UTF-8")
        tensors = list(g.initializer)
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensors.append(a.t)
                tensors.extend(a.tensors)
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                stack.extend(a.graphs)
        for t in tensors:
            problem = _tensor_problem(t)
            if problem:
                raise ModelError(f"{what} is not a valid ONNX model: tensor {t.name!r} {problem}")


def check_strings(model: onnx.ModelProto, what: str = "the model") -> None:
    """Every string field (node, tensor, graph, attribute names; domains, doc
    strings, metadata) is valid UTF-8, as the ONNX spec requires and
    onnx.checker does not check; a ModelError naming the first bad one."""
    from google.protobuf.descriptor import FieldDescriptor as F

    stack = [model]
    while stack:
        msg = stack.pop()
        for fd, value in msg.ListFields():
            if fd.type == F.TYPE_MESSAGE:  # (FieldDescriptor.label is gone in protobuf 7)
                if isinstance(value, Message):
                    stack.append(value)
                else:
                    stack.extend(value)
            elif fd.type == F.TYPE_STRING:
                for v in ([value] if isinstance(value, (str, bytes)) else value):
                    if not isinstance(v, str):
                        raise ModelError(f"{what} is not a valid ONNX model: the {fd.name} "
                                         f"'{printable(v)}' of a {msg.DESCRIPTOR.name} is not valid UTF-8")


def check_model(model: onnx.ModelProto, what: str = "the model", full: bool = False) -> None:
    try:
        if proto_size(model) > EXTERNAL_DATA_THRESHOLD:
            return  # the in-memory checker cannot take >2 GB; the rewrite checks its own subgraphs
        onnx.checker.check_model(model, full_check=full)
    except Exception as e:
        raise ModelError(f"{what} fails onnx.checker: {first_line(e)}") from None


def check_model_file(path, what: str = "the model") -> None:
    """Check a model file (any size; external data beside it)."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ModelError(f"{what} fails onnx.checker: {first_line(e)}") from None


def check_output_path(in_path, out_path) -> Path:
    """Refuse an output that is the input, that cannot be written, or that is a
    special file (a device, FIFO or socket is never replaced by a regular file)."""
    out = Path(out_path)
    if in_path is not None:
        inp = Path(in_path)
        if out.resolve() == inp.resolve() or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
            raise UsageError("the output path is the input path; the input is never overwritten, choose another name")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"output directory {str(parent)!r} is not a directory")
    if not parent.is_dir():
        raise UsageError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory {str(parent)!r} is not writable")
    if out.is_dir():
        raise UsageError(f"output path {str(out)!r} is a directory")
    try:
        st = out.stat()
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"output path {str(out)!r} is not a regular file (a device, FIFO or socket); "
                         f"only regular files are written")
    return out


def input_files(path) -> list[Path]:
    """The files a model consists of: the .onnx and every external-data file it
    references (resolved; onnx ≥ 1.23 only reads those inside the model's
    directory).  Only the model's structure is read, never its weights."""
    p = Path(path)
    files = [p.resolve()]
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # load_model reports a bad file with its own sentence
        return files
    base = p.resolve().parent
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if isinstance(loc, str) and loc and (base / loc).resolve() not in files:
                files.append((base / loc).resolve())
    return files


def same_file(a, b) -> bool:
    """``a`` and ``b`` name one file: the same resolved path, or (where both
    exist) the same device and inode, which also catches hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_outputs(in_path, outputs: list[tuple[str, object]], other_inputs=(), out_dirs=()) -> list[Path]:
    """The one rule on a command's paths, for every subcommand: every output
    (``(what, path)``, e.g. ``("--report", "r.json")``) is writable (see
    :func:`check_output_path`), differs from every other output, from every
    file the input model(s) ``in_path`` (a path, a list of paths, or None)
    consist of, external data included, and from every other input
    (``(what, path)``: calibration data, a plan and its factors file, a
    checkpoint, a teacher, a source file...).  ``out_dirs`` (``(what, dir)``,
    e.g. a checkpoint directory) must be neither an input nor an output.  "Differs"
    compares resolved paths and, where the files exist, device and inode
    (hard links).  A UsageError (exit 2) of one sentence otherwise; returns
    the output paths."""
    models = [m for m in (in_path if isinstance(in_path, (list, tuple)) else [in_path]) if m is not None]
    paths = [(what, check_output_path(None, p)) for what, p in outputs if p is not None]  # inputs: below, named
    for i, (what, p) in enumerate(paths):
        for what2, q in paths[:i]:
            if same_file(p, q):
                raise UsageError(f"{what} {str(p)!r} is the same file as {what2}; each output needs its own name")
    dirs = [(what, q) for what, q in out_dirs if q is not None]
    for what, p in paths:
        for what_dir, q in dirs:
            if same_file(p, q):
                raise UsageError(f"{what} {str(p)!r} is also given as {what_dir}; each output needs its own name")
    inputs = [(what, q) for what, q in other_inputs if q is not None]
    inputs += [("the input model", m) for m in models]
    for what_in, q in inputs:
        for what, p in paths + dirs:
            if same_file(p, q):
                raise UsageError(f"{what} {str(p)!r} is the file given as {what_in}; inputs are never "
                                 f"overwritten, choose another name")
    for m in models:
        _check_external_data(m, paths + dirs)
    return [p for _, p in paths]


def _check_external_data(in_path, paths) -> None:
    """No output is one of the external-data files of the model ``in_path``."""
    if not Path(in_path).is_file():
        return
    # an existing output can only be one of the input's files if it lies in the input's directory
    # (external data must, and is never a link or a hard link): only then read the model's structure
    in_dir = os.path.realpath(Path(in_path).parent)
    existing = [(what, p) for what, p in paths if os.path.lexists(p) and
                os.path.realpath(p).startswith(in_dir + os.sep)]
    if not existing:
        return
    files = input_files(in_path)
    for what, p in existing:
        for f in files[1:]:
            if same_file(p, f):
                raise UsageError(f"{what} {str(p)!r} is the input's external data file {f.name!r}; the input "
                                 f"is never overwritten, choose another name")


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def printable(text) -> str:
    """``text`` safe to print on a terminal: control characters (escape
    sequences, carriage returns, bidi overrides) become ``\\xNN``/``\\uNNNN``,
    and bytes that are not UTF-8 are shown as ``\\xNN``."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "backslashreplace")
    text = str(text)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OutputError(UsageError):
    """An output could not be written (disk full, read-only, ...): exit 2."""


def _write_error(path, e: OSError) -> OutputError:
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    return OutputError(f"cannot write {str(path)!r}: {reason}; nothing was written")


TMP_PREFIX = ".oa-"  # short: a legal 250-character name plus the temporary suffix stays under 255


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A ``TemporaryDirectory`` (use it in ``with``) whose creation a Ctrl-C or
    SIGTERM cannot split from the registration of its cleanup: while it is
    made, the two signals are only recorded, then handed to the handlers that
    were installed, once the object that removes the directory exists (a
    signal between ``mkdtemp`` and that moment would leave the directory
    behind). Outside the main thread, where handlers cannot change, a plain one."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return tempfile.TemporaryDirectory(prefix=prefix)
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        made = tempfile.TemporaryDirectory(prefix=prefix)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        for sig in held:
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)
    except BaseException:
        made.cleanup()
        raise
    return made


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a fresh temporary file beside ``path`` (``mkstemp``: O_EXCL,
    never through a planted link), then rename it into place.  A failed write
    (disk full, ...) is an :class:`OutputError` and leaves nothing behind."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=path.parent or ".")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: onnx.ModelProto, path, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` atomically; weights go to ``<name>.data`` beside it when
    the model is too large for one protobuf (or when asked).  ``model`` is
    left as it was (onnx's external-data writer moves the bytes out of the
    tensors; they are read back from the written file, one tensor at a time,
    so no second copy of the weights is ever held).  Returns the paths written."""
    path = Path(path)
    if external_data is None:
        external_data = proto_size(model) > EXTERNAL_DATA_THRESHOLD or not _no_external(model)
    if not external_data:
        atomic_write_bytes(path, model.SerializeToString())
        return [path]
    data_name = f"{path.name}.data"
    try:
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=path.parent or ".") as tmpdir:
            tmp_model = Path(tmpdir) / path.name
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            written = []
            tmp_data = Path(tmpdir) / data_name
            if tmp_data.exists():
                os.replace(tmp_data, path.parent / data_name)
                written.append(path.parent / data_name)
            os.replace(tmp_model, path)
            written.insert(0, path)
    except OSError as e:
        raise _write_error(path, e) from None
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.DEFAULT:
            t.ClearField("data_location")  # as it was: serialises byte for byte the same
    return written


def _no_external(model: onnx.ModelProto) -> bool:
    return not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """IR version, opsets, producer and metadata of ``src`` onto ``dst``."""
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, f, getattr(src, f))
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)


_RAW_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
               onnx.TensorProto.FLOAT16: np.float16}


class ProtoValues(LazyValues):
    """graphsurgeon's lazily loaded constant, read with one copy instead of three: a float tensor
    stored as raw little-endian bytes becomes a read-only array over one copy of those bytes
    (graphsurgeon's ``numpy_helper.to_array`` then ``np.array`` held the protobuf's bytes, their
    copy and the array at once: three times a 64 MB weight)."""

    def load(self):
        t = self.tensor
        dtype = _RAW_FLOATS.get(t.data_type)
        if dtype is not None and sys.byteorder == "little" and t.HasField("raw_data") \
                and t.data_location != onnx.TensorProto.EXTERNAL and not t.HasField("segment"):
            raw = t.raw_data
            shape = tuple(t.dims)
            if len(raw) == int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                return np.frombuffer(raw, dtype=dtype).reshape(shape)
        return super().load()


def _graph_constants(graph: gs.Graph):
    """Every constant of ``graph`` and of its subgraphs, node attributes included."""
    for g in [graph] + [sg for n in graph.nodes for sg in n.subgraphs(recursive=True)]:
        for t in list(g.tensors().values()) + [v for n in g.nodes for v in n.attrs.values()]:
            if isinstance(t, gs.Constant):
                yield t


def _import(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` whose constants are read through :class:`ProtoValues`."""
    graph = gs.import_onnx(model)
    for c in _graph_constants(graph):
        if type(c._values) is LazyValues:  # exactly graphsurgeon's, not a subclass
            c._values = ProtoValues(c._values.tensor)
    return graph


def _backing(t) -> gs.Constant | None:
    """The constant that holds the value of ``t`` (itself, or a Constant node's value)."""
    if isinstance(t, gs.Constant):
        return t
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return v
    return None


def peek_value(t):
    """``constant_value(t)`` without keeping the array on the graph: a constant still in the
    protobuf is read again on every call, so that the weights stay there once, and a layer's
    array lives only while a stage works on it."""
    c = _backing(t)
    if c is not None and isinstance(c._values, LazyValues):
        return c._values.load()
    return constant_value(t)


@contextmanager
def values_not_kept(tensors):
    """Constants among ``tensors`` that are read inside the block (graphsurgeon keeps what it
    loads) go back to being read from the protobuf when it ends: extraction reads every weight
    once, and would otherwise leave a second copy of all of them on the graph."""
    lazy = [(c, c._values) for c in map(_backing, tensors) if c is not None and isinstance(c._values, LazyValues)]
    try:
        yield
    finally:
        for c, values in lazy:
            c._values = values


@dataclass
class Source:
    """The model being rewritten and its graphsurgeon graph: the one owner of
    the weights.  Analysis results (:mod:`onnx_alds.extract`) refer to layers
    by node position and read weights through :meth:`weight4`; emission
    (:mod:`onnx_alds.emit`) edits ``graph`` and releases weights it no longer
    needs.  The weights stay in ``model`` (the protobuf) only: :meth:`weight4`
    reads a layer's weight from it each time, and nothing keeps that array
    once its stage is done (:func:`peek_value`)."""

    model: onnx.ModelProto
    graph: gs.Graph
    path: str | None = None

    @classmethod
    def load(cls, model_or_path) -> "Source":
        if isinstance(model_or_path, onnx.ModelProto):
            check_strings(model_or_path)  # as load_model does for files
            return cls(model_or_path, _import(model_or_path), None)
        model = load_model(model_or_path)
        return cls(model, _import(model), str(model_or_path))

    @property
    def large(self) -> bool:
        return proto_size(self.model) > EXTERNAL_DATA_THRESHOLD

    def node(self, layer) -> gs.Node:
        return self.graph.nodes[layer.node_index]

    def weight4(self, layer) -> np.ndarray:
        """The layer's weight as ``f × c × κ1 × κ2`` in its stored dtype."""
        return layer.spec.weight4(self.stored_weight(layer), layer.attrs)

    def stored_weight(self, layer) -> np.ndarray:
        """The layer's weight as the graph stores it (layout and dtype)."""
        return np.asarray(peek_value(self.node(layer).inputs[1]))

    def bias(self, layer) -> np.ndarray | None:
        node = self.node(layer)
        return np.asarray(constant_value(node.inputs[2])) if has_bias(node) and layer.bias_constant else None

    def release(self, layer) -> None:
        """Free the original weight (its node is being replaced and it has no other reader)."""
        w = self.node(layer).inputs[1]
        if isinstance(w, gs.Constant):
            w.values = np.zeros((0,), np.float32)

    def detach(self) -> None:
        """For a large model we loaded ourselves: load every constant of the graph
        into numpy and keep only a weightless shell of the model (IR version,
        opsets, metadata, If/Loop/Scan bodies and the outer weights they read),
        so that the protobuf that held the original bytes is freed.  Peak memory
        then stays near two copies of the weights, not three."""
        graph, model = self.graph, self.model
        for t in _graph_constants(graph):
            t.values  # noqa: B018 - loads LazyValues, dropping the reference to the protobuf
        shell = onnx.ModelProto()
        copy_model_fields(model, shell)
        shell.functions.extend(model.functions)
        bodies = subgraph_bodies(model.graph)
        shell.graph.node.extend(bodies)
        read = names_read_inside(bodies)
        shell.graph.initializer.extend(t for t in model.graph.initializer if t.name in read)
        # graphsurgeon keeps the model's opset list, a view that would keep the whole protobuf alive
        graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains]
        self.model = shell
        trim_memory()


def check_rewritten(original: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """Full check (with strict shape inference) of the rewritten model; where
    the original itself does not pass the full check, the plain check."""
    try:
        check_model(new, "the rewritten model", full=True)
    except ModelError:
        try:
            check_model(original, "the input model", full=True)
        except ModelError:
            check_model(new, "the rewritten model", full=False)
            return
        raise
