"""Load and save ONNX models: clear errors, atomic writes, external data.

Nothing here ever writes to the input path: outputs go to a temporary file in
the destination directory that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, UsageError

# protobuf cannot serialise a single message over 2 GiB; stay clear of it
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path, *, check: bool = True) -> onnx.ModelProto:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"input file {str(p)!r} does not exist")
    if p.is_dir():
        raise ModelError(f"input path {str(p)!r} is a directory, not an ONNX file")
    if p.stat().st_size == 0:
        raise ModelError(f"input file {str(p)!r} is empty")
    try:
        model = onnx.load(str(p))
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise ModelError(f"{str(p)!r} is not a valid ONNX model (protobuf parse failed: {_first_line(e)})") from None
    except FileNotFoundError as e:
        missing = Path(e.filename).name if e.filename else _first_line(e)
        raise ModelError(f"external data file {missing!r} of {str(p)!r} is missing") from None
    except OSError as e:
        raise ModelError(f"cannot read {str(p)!r}: {e.strerror or _first_line(e)}") from None
    except Exception as e:  # onnx raises assorted errors on malformed external-data records
        raise ModelError(f"{str(p)!r} is not a valid ONNX model ({_first_line(e)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"{str(p)!r} is not an ONNX model (it has no graph)")
    if check:
        check_model(model, str(p))
    return model


def check_model(model: onnx.ModelProto, what: str = "the model", full: bool = False) -> None:
    try:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            return  # the in-memory checker cannot take >2 GB; the rewrite checks its own subgraphs
        onnx.checker.check_model(model, full_check=full)
    except Exception as e:
        raise ModelError(f"{what} fails onnx.checker: {_first_line(e)}") from None


def check_model_file(path, what: str = "the model") -> None:
    """Check a model file (any size; external data beside it)."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ModelError(f"{what} fails onnx.checker: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def check_output_path(in_path, out_path) -> Path:
    """Refuse an output that is the input, or that cannot be written."""
    out = Path(out_path)
    if in_path is not None:
        inp = Path(in_path)
        if out.resolve() == inp.resolve() or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
            raise UsageError("the output path is the input path; the input is never overwritten, choose another name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory {str(parent)!r} is not writable")
    if out.is_dir():
        raise UsageError(f"output path {str(out)!r} is a directory")
    return out


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: onnx.ModelProto, path, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` atomically; weights go to ``<name>.data`` beside it when
    the model is too large for one protobuf (or when asked).  Returns the
    paths written."""
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _no_external(model) else True
    if not external_data:
        atomic_write_bytes(path, model.SerializeToString())
        return [path]
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent or ".") as tmpdir:
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
    return written


def _no_external(model: onnx.ModelProto) -> bool:
    return not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
