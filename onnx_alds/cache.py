"""On-disk caches (singular values for ``--cache-dir``, latency tables): every
entry is an untrusted file.

An entry is read only when it is a regular file (never a link, FIFO or
device: it is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with
``fstat``), no larger than a cap, parses without pickle, and holds the key
it is filed under; the caller then checks its content.  Anything else is a
cache miss with a warning, never an error.  Entries are written to a fresh
``mkstemp`` file in the cache directory (``O_EXCL``, so a planted name or
link is never followed) and renamed into place; a failed write is a warning.

An entry that passes every check is used as it is: share a cache directory
only with people you would let write your models.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

import numpy as np

from .errors import UsageError
from .folding import fold

log = logging.getLogger(__name__)

MAX_ENTRY_BYTES = 256 << 20  # a spectra entry of a 16k × 16k layer at k = 1 is 128 KiB


def cache_root() -> Path:
    """``$ONNX_ALDS_CACHE``, else ``~/.cache/onnx-alds``: the default home of every measured cache."""
    return Path(os.environ.get("ONNX_ALDS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "onnx-alds"))


def default_dir(name: str, given=None, what: str = "the cache directory") -> Path | None:
    """A cache directory: one given explicitly must be usable (a UsageError
    otherwise); the default one (``cache_root() / name``), when it cannot be
    used, is skipped with a warning and the work runs without a cache."""
    if given is not None:
        return usable_dir(given, what)
    try:
        return usable_dir(cache_root() / name, what)
    except UsageError as e:
        log.warning("%s; running without a cache", e)
        return None


def usable_dir(path, what: str = "--cache-dir") -> Path:
    """``path`` as a directory the caches can write to, created if missing;
    a UsageError (one sentence) when it is a file or cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {str(p)!r} is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {str(p)!r} cannot be created: {e.strerror or e}") from None
    try:  # os.access says yes to root on a read-only file system: really try
        fd, probe = tempfile.mkstemp(prefix=".oa-", suffix=".tmp", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{what} {str(p)!r} is not writable: {e.strerror or e}") from None
    return p


def read_entry(path, max_bytes: int = MAX_ENTRY_BYTES) -> bytes | None:
    """The bytes of a regular file, or None (with a warning unless it is simply absent)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        what = "a symbolic link" if e.errno == errno.ELOOP else e.strerror or str(e)
        log.warning("cache entry %s ignored: %s", path, what)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("cache entry %s ignored: not a regular file", path)
            return None
        if st.st_size > max_bytes:
            log.warning("cache entry %s ignored: %d bytes is over the %d limit", path, st.st_size, max_bytes)
            return None
        chunks, left = [], max_bytes + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            log.warning("cache entry %s ignored: over the %d-byte limit", path, max_bytes)
            return None
        return data
    except OSError as e:
        log.warning("cache entry %s ignored: %s", path, e.strerror or e)
        return None
    finally:
        os.close(fd)


def write_entry(path, data: bytes) -> bool:
    """Write an entry atomically, best effort: False (and a warning) when it fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".oa-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        log.warning("cache entry %s not written: %s", path, e.strerror or e)
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # replaces a planted link itself, never what it points to
        return True
    except OSError as e:
        log.warning("cache entry %s not written: %s", path, e.strerror or e)
    except BaseException:
        _unlink(tmp)
        raise
    _unlink(tmp)
    return False


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- singular values (spectra.compute_spectra) -------------------------------------------------

def spectra_key(w4: np.ndarray, scheme: str, k: int) -> str:
    h = hashlib.sha1(np.ascontiguousarray(w4).tobytes())
    h.update(f"{w4.shape}|{w4.dtype}|{scheme}|{k}".encode())
    return h.hexdigest()


def spectra_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"{key}.npz"


def save_spectra(cache_dir, key: str, sv: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), sv=np.asarray(sv, np.float64))
    write_entry(spectra_path(cache_dir, key), buf.getvalue())


def load_spectra(cache_dir, key: str, w4: np.ndarray, scheme: str, k: int) -> np.ndarray | None:
    """The cached singular values of the ``k`` slices of ``w4`` folded by
    ``scheme`` (whose key is ``key``), or None.  Beyond the key, the entry must have shape
    ``(k, min(rows, cols))``, be finite, non-negative and descending per group,
    and its squares must sum, per group, to the slice's ‖W_i‖_F² (what every
    exact spectrum satisfies, and cheap to check against the weights)."""
    path = spectra_path(cache_dir, key)
    data = read_entry(path)
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            stored_key, sv = str(z["key"][()]), np.asarray(z["sv"])
    except Exception as e:  # zip, npy header, pickled object arrays: all a miss
        log.warning("cache entry %s ignored: unreadable (%s)", path, type(e).__name__)
        return None
    problem = _spectra_problem(stored_key, key, sv, fold(np.asarray(w4, np.float64), scheme, k))
    if problem:
        log.warning("cache entry %s ignored: %s", path, problem)
        return None
    return sv


def _spectra_problem(stored_key: str, key: str, sv: np.ndarray, folded: np.ndarray) -> str | None:
    if stored_key != key:
        return "it was written for other weights"
    k, rows, cols = folded.shape
    if sv.dtype != np.float64 or sv.shape != (k, min(rows, cols)):
        return f"shape {sv.shape} {sv.dtype} where (k, r) = {(k, min(rows, cols))} float64 is expected"
    if not np.isfinite(sv).all() or (sv < 0).any():
        return "it holds negative or non-finite singular values"
    if (np.diff(sv, axis=1) > 0).any():
        return "its singular values are not in descending order"
    frob = np.einsum("kij,kij->k", folded, folded)
    if not np.allclose((sv * sv).sum(axis=1), frob, rtol=1e-6, atol=1e-12 * max(float(frob.max(initial=0)), 1e-300)):
        return "its singular values do not match the weights' norms"
    return None


# --- latency tables (latency.LatencyTable) -----------------------------------------------------

def load_json_entry(path, key_src: dict) -> dict | None:
    """A latency entry ``{"key": key_src, "ms": {tag: ms}}``, or None: the stored
    key must equal ``key_src`` and every time be a finite, non-negative number."""
    data = read_entry(path)
    if data is None:
        return None
    try:
        entry = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, NaN/Infinity, huge ints
        log.warning("cache entry %s ignored: not valid JSON (%s)", path, type(e).__name__)
        return None
    if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key_src)) or not isinstance(entry.get("ms"), dict):
        log.warning("cache entry %s ignored: it is not the entry of this layer", path)
        return None
    for tag, ms in entry["ms"].items():
        if not _duration(ms):
            log.warning("cache entry %s ignored: time %r of %r is not a valid duration", path, ms, tag)
            return None
    _drop_bad_learned(path, entry)
    return entry


def _duration(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v < 1e9


PENALTY_BOUND = 10.0  # a learned penalty is at most this many times the whole model's time, either way


def _drop_bad_learned(path, entry: dict) -> None:
    """A whole model's entry also holds what was learned about it: ``context``
    (each layer's time in the model, ms), ``penalty`` (ms added to a layer's
    factorization, either sign, within :data:`PENALTY_BOUND` times the model's time) and
    ``beta``.
    A part that is not of its type or range is dropped with a warning, and
    so measured again (a miss), never used."""
    context = entry.get("context")
    if "context" in entry and not (isinstance(context, dict) and all(
            isinstance(k, str) and _duration(v) for k, v in context.items())):
        log.warning("cache entry %s: its in-context times %.60r are not durations; measuring them again",
                    path, context)
        entry.pop("context")
        entry.pop("penalty", None)  # learned against those times
    penalty = entry.get("penalty")
    # a penalty corrects a factorization's predicted cost, either way: below minus the layer's own time
    # when the table predicted it slower than the layer and it ran faster; never more than the whole
    # model's time many times over (a -1e6 made a 2.15x rewrite predict 15-44x)
    model_ms = entry.get("ms", {}).get("model") if isinstance(entry.get("ms"), dict) else None
    bound = PENALTY_BOUND * (model_ms if _duration(model_ms) and model_ms > 0 else 1e3)
    if "penalty" in entry and not (isinstance(penalty, dict) and all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float)) and
            -bound <= v <= bound for k, v in penalty.items())):
        log.warning("cache entry %s: its learned penalties %.60r are not valid times; ignoring them", path, penalty)
        entry.pop("penalty")
    beta = entry.get("beta")
    if "beta" in entry and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1e3):
        log.warning("cache entry %s: its beta %.60r is not a positive number; ignoring it", path, beta)
        entry.pop("beta")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def save_json_entry(path, entry: dict) -> None:
    write_entry(path, json.dumps(entry, indent=1).encode())
