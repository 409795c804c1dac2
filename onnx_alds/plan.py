"""The Plan: per layer ``(name, weight, k, scheme, rank)`` plus the budget it
was solved for.  Plain data, JSON in and out; produced by the selector and
consumed by the ONNX emitter and the torch side alike.

Weight-only factors follow from the weights and the plan alone.  Data-aware
factors also depend on the calibration data, so a plan made with them
carries them: ``plan.json`` names a sidecar ``plan.factors.npz`` (encoder,
decoder and bias correction of every layer, ``allow_pickle=False``) with its
SHA-256, and both ``rewrite --apply-plan`` and ``onnx_alds.torch.apply_plan``
use those factors as they are."""

from __future__ import annotations

import json
import logging
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError
from .folding import SCHEMES, decoder_kernel, encoder_kernel

log = logging.getLogger(__name__)

PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    name: str
    weight: str
    k: int
    scheme: str
    rank: int


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)
    budget: dict = field(default_factory=dict)
    version: int = PLAN_VERSION
    factors: dict | None = field(default=None, repr=False)  # layer name → ops.Factors (data-aware plans)
    factors_file: str | None = field(default=None, repr=False)  # where they were read from (for messages)
    weight_digests: dict | None = field(default=None, repr=False)  # weight name → digest the factors were made for

    def to_dict(self) -> dict:
        return {"version": self.version, "budget": dict(self.budget),
                "layers": [asdict(l) for l in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @staticmethod
    def factors_path(path) -> Path:
        p = Path(path)
        return p.with_name(p.stem + ".factors.npz")

    @classmethod
    def sidecar_of(cls, path) -> Path | None:
        """The factors file a plan file uses (named in its ``factors`` entry,
        beside it), else the one a data-aware plan of that name would get:
        an input of ``--apply-plan``, never to be overwritten.  None without a path."""
        if path is None:
            return None
        try:
            ref = _read_json(path).get("factors")
            if isinstance(ref, dict) and isinstance(ref.get("file"), str):
                return Path(path).parent / Path(ref["file"]).name
        except (UsageError, AttributeError):
            pass  # Plan.load says what is wrong with it
        return cls.factors_path(path)

    def save(self, path, weights: dict | None = None) -> list[Path]:
        """Write the plan (and its factors sidecar, when it carries factors); returns the paths.
        ``weights`` (weight name → :func:`weight_digests`) are recorded in the sidecar, so that
        its factors are refused for other weights."""
        import hashlib
        import io as _io

        import numpy as np

        from .io import atomic_write_bytes

        d = self.to_dict()
        written = []
        if self.factors:
            arrays = {}
            for name, f in self.factors.items():
                arrays[f"{name}|encoder"] = f.encoder
                arrays[f"{name}|decoder"] = f.decoder
                if f.bias_delta is not None:
                    arrays[f"{name}|bias_delta"] = np.asarray(f.bias_delta)
            for l in self.layers:
                if weights and l.name in self.factors and l.weight in weights:
                    arrays[f"{l.name}|weight_sha256"] = np.asarray(weights[l.weight])
            buf = _io.BytesIO()
            np.savez(buf, **arrays)
            data = buf.getvalue()
            side = self.factors_path(path)
            atomic_write_bytes(side, data)
            written.append(side)
            d["factors"] = {"file": side.name, "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_bytes(path, (json.dumps(d, indent=2) + "\n").encode())
        return [Path(path)] + written

    def load_factors(self, ref: dict, base: Path) -> None:
        """Read the factors sidecar: untrusted input.  A regular file (never a
        FIFO or device), matching the plan's SHA-256, whose members are
        ``.npy`` arrays of sane declared size (checked in the zip and npy
        headers before anything is decompressed); shapes and dtypes are checked
        against the model in :func:`resolve`."""
        from .ops.base import Factors

        if not isinstance(ref, dict) or not isinstance(ref.get("file"), str):
            raise UsageError("the plan's 'factors' entry needs a 'file'")
        side = base / Path(ref["file"]).name  # beside the plan, never elsewhere
        arrays = _read_sidecar(side, ref.get("sha256") if isinstance(ref.get("sha256"), str) else None)
        factors, digests = {}, {}
        for l in self.layers:
            try:
                factors[l.name] = Factors(arrays[f"{l.name}|encoder"], arrays[f"{l.name}|decoder"],
                                          arrays.get(f"{l.name}|bias_delta"))
            except KeyError:
                raise UsageError(f"the plan's factors file has no factors for layer {l.name!r}") from None
            if f"{l.name}|weight_sha256" in arrays:
                digests[l.weight] = str(arrays[f"{l.name}|weight_sha256"])
        self.factors, self.factors_file = factors, str(side)
        self.weight_digests = digests if len(digests) == len(self.layers) else None

    def check_weights(self, digests: dict) -> None:
        """Refuse factors made for other weights: ``digests`` (weight name →
        :func:`weight_digests` of the model being rewritten) must match the
        ones the sidecar recorded.  A sidecar without them (written before they
        were recorded) is used with a warning."""
        if not self.factors:
            return
        if self.weight_digests is None:
            log.warning("the plan's factors file %r records no weight digests (an older version wrote it), so "
                        "it is not checked against the model's weights", self.factors_file)
            return
        for l in self.layers:
            if digests.get(l.weight) != self.weight_digests.get(l.weight):
                raise UsageError(f"the plan's factors file {self.factors_file!r} was made for other weights than "
                                 f"this model's {l.weight!r} (layer {l.name!r}); rerun rewrite --plan on this model")

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
            raise UsageError("the plan has no 'layers' list")
        if not isinstance(d.get("budget", {}), dict):
            raise UsageError("the plan's 'budget' is not an object")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION or isinstance(d.get("version"), bool):
            raise UsageError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        layers = []
        for i, e in enumerate(d["layers"]):
            if not isinstance(e, dict) or not {"name", "k", "rank"} <= set(e):
                raise UsageError(f"plan entry {i} is not an object with 'name', 'k' and 'rank'")
            for key in ("name", "weight", "scheme"):
                if key in e and not isinstance(e[key], str):
                    raise UsageError(f"plan entry {i}: '{key}' must be a string, not {_shown(e[key])}")
            name = e["name"]
            for key in ("k", "rank"):  # exact integers: 2.9 or true are refused, not truncated
                v = e[key]
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise UsageError(f"plan entry {name!r}: '{key}' must be an integer, not {_shown(v)}")
                if not 0 < v <= MAX_DIM:
                    raise UsageError(f"plan entry {name!r} needs k ≥ 1 and rank ≥ 1 "
                                     f"(and at most {MAX_DIM}), not {key} = {_shown(v)}")
            lp = LayerPlan(name=name, weight=e.get("weight", ""), k=int(e["k"]), scheme=e.get("scheme", "s0"),
                           rank=int(e["rank"]))
            if lp.scheme not in SCHEMES:
                raise UsageError(f"plan entry {lp.name!r} has unknown scheme {lp.scheme!r}")
            layers.append(lp)
        return cls(layers=layers, budget=_budget(d.get("budget", {})))

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan file: a regular file of at most MAX_PLAN_BYTES, UTF-8,
        strict JSON (no NaN/Infinity, integers of sane length, bounded nesting)."""
        d = _read_json(path)
        plan = cls.from_dict(d)
        if isinstance(d, dict) and d.get("factors") is not None:
            plan.load_factors(d["factors"], Path(path).parent)
        return plan


MAX_DIM = 1 << 40  # no tensor dimension comes near this
MAX_PLAN_BYTES = 64 << 20  # a plan is ~100 bytes a layer: room for 600k layers


def _shown(v) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _budget(b: dict) -> dict:
    """The budget a plan was solved for is data to report, never to act on:
    only JSON scalars are kept (numbers finite, strings short)."""
    out = {}
    for key, v in b.items():
        if v is None or isinstance(v, bool) or (isinstance(v, str) and len(v) <= 200) or \
                (isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e300):
            out[str(key)] = v
        else:
            raise UsageError(f"the plan's budget entry {str(key)[:40]!r} is not a number or short string")
    return out


def _read_json(path):
    import os
    import stat

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise UsageError(f"cannot read plan file {str(path)!r}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"plan file {str(path)!r} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read plan file {str(path)!r}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PLAN_BYTES:
        raise UsageError(f"plan file {str(path)!r} is over {MAX_PLAN_BYTES >> 20} MB; it cannot be a plan")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"plan file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise UsageError(f"plan file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise UsageError(f"plan file {str(path)!r} is nested too deeply to be a plan") from None
    except ValueError as e:  # NaN/Infinity, integers over 4300 digits
        msg = str(e).split(":")[0].split(";")[0].split(" (")[0]
        raise UsageError(f"plan file {str(path)!r} is not a valid plan ({msg})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


MAX_FACTOR_BYTES = 8 << 30  # one layer's factor: far above any real one, far below a zip bomb's claim


def _read_sidecar(side: Path, sha256: str | None) -> dict:
    """The arrays of a factors sidecar, or one UsageError sentence naming it."""
    import hashlib
    import os
    import stat
    import zipfile

    what = f"the plan's factors file {str(side)!r}"
    try:
        fd = os.open(side, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as e:
        raise UsageError(f"cannot read {what}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{what} is not a regular file")
        try:
            if sha256:
                h = hashlib.sha256()
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                if h.hexdigest() != sha256:
                    raise UsageError(f"{what} does not match the plan (SHA-256 differs)")
                f.seek(0)
            with zipfile.ZipFile(f) as z:
                return {info.filename[:-4]: _read_member(z, info, what) for info in z.infolist()}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError):
            raise UsageError(f"{what} is not a valid .npz") from None


def _read_member(z, info, what: str):
    """One ``.npy`` member, its declared sizes checked before it is decompressed."""
    import numpy as np

    name = info.filename
    if not name.endswith(".npy"):
        raise UsageError(f"{what} holds {name!r}, which is not an .npy array")
    # np.savez stores members uncompressed; a member that inflates far beyond its stored size is a bomb
    if info.file_size > MAX_FACTOR_BYTES or info.file_size > 2 * info.compress_size + (1 << 16):
        raise UsageError(f"{what}: member {name!r} declares {info.file_size:,} bytes from {info.compress_size:,} "
                         f"stored; refused before decompressing")
    with z.open(info) as m:
        version = np.lib.format.read_magic(m)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(m)
        if dtype.hasobject or dtype.kind not in "fU":
            raise UsageError(f"{what}: array {name[:-4]!r} has dtype {dtype}, not floating point")
        if int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
            raise UsageError(f"{what}: array {name[:-4]!r} declares shape {shape}, more than the member holds")
    with z.open(info) as m:
        return np.lib.format.read_array(m, allow_pickle=False)


def weight_digests(model, names) -> dict:
    """SHA-256 of each named weight (initializer or Constant output of the main
    graph) over its dtype, shape and values: what a factors sidecar was made for."""
    import hashlib

    import numpy as np
    from onnx import numpy_helper

    names = set(names)
    tensors = {t.name: t for t in model.graph.initializer if t.name in names}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names and node.attribute and \
                node.attribute[0].name == "value":
            tensors.setdefault(node.output[0], node.attribute[0].t)
    out = {}
    for name, t in tensors.items():
        a = np.ascontiguousarray(numpy_helper.to_array(t))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[name] = h.hexdigest()
    return out


def check_factors(plan: Plan, layer, entry) -> None:
    """The sidecar's factors for ``entry`` fit the model's ``layer`` (see :func:`check_factor_arrays`)."""
    g = layer.geometry
    check_factor_arrays(plan, entry, (g.f, g.c, *g.kernel), layer.dtype or None)


def check_factor_arrays(plan: Plan, entry, shape4, dtype=None) -> None:
    """The sidecar's factors for ``entry`` fit a weight of ``shape4`` (f, c,
    κ1, κ2) and ``dtype``: encoder ``(k·j, c/k, e1, e2)``, decoder ``(f, k·j,
    d1, d2)`` of the weight's dtype, a bias correction of ``f`` values, all
    finite (one UsageError naming the file).  The ONNX rewrite and
    ``onnx_alds.torch.apply_plan`` both check this before using them."""
    import numpy as np

    fac = (plan.factors or {}).get(entry.name)
    if fac is None:
        return
    f, c, k1, k2 = shape4
    what = f"the plan's factors file {plan.factors_file or '(in memory)'!r}"
    kj = entry.k * entry.rank
    want = {"encoder": (kj, c // entry.k, *encoder_kernel(entry.scheme, (k1, k2))),
            "decoder": (f, kj, *decoder_kernel(entry.scheme, (k1, k2)))}
    for part, shape in want.items():
        a = getattr(fac, part)
        if not isinstance(a, np.ndarray) or tuple(a.shape) != shape:
            raise UsageError(f"{what} has an {part} of shape {tuple(np.shape(a))} for layer {entry.name!r}, but the "
                             f"plan's k={entry.k}, rank={entry.rank}, {entry.scheme} need {shape}")
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise UsageError(f"{what} holds {a.dtype} factors for layer {entry.name!r}, whose weight is "
                             f"{np.dtype(dtype)}; rerun rewrite --plan to make factors of the model's dtype")
        if not np.isfinite(a).all():
            raise UsageError(f"{what} holds NaN or inf in the {part} of layer {entry.name!r}")
    if fac.bias_delta is not None:
        b = np.asarray(fac.bias_delta)
        if b.shape != (f,) or b.dtype.kind != "f" or not np.isfinite(b).all():
            raise UsageError(f"{what} has a bias correction of shape {b.shape} ({b.dtype}) for layer "
                             f"{entry.name!r}, which needs {f} finite values")


def resolve(plan: Plan, info) -> dict:
    """Check a plan against the analysed model; returns layer name → (k, scheme, rank)."""
    from .cost import full_rank

    by_name = {l.name: l for l in info.layers}
    by_weight = {l.weight_name: l for l in info.layers}
    out = {}
    for e in plan.layers:
        l = by_name.get(e.name) or by_weight.get(e.weight)
        if l is None:
            raise UsageError(f"the plan names layer {e.name!r}, which is not in the model")
        if l.status != "candidate":
            raise UsageError(f"the plan factorizes {l.name!r}, which cannot be compressed ({l.reason})")
        g = l.geometry
        if g.c % e.k:
            raise UsageError(f"the plan's k={e.k} for {l.name!r} does not divide its {g.c} input channels")
        if e.k > 1 and not l.allow_groups:
            raise UsageError(f"{l.name!r} has an activation of unknown rank, so only k=1 can be emitted")
        if e.scheme not in l.schemes:
            raise UsageError(f"scheme {e.scheme} does not apply to {l.name!r} (kernel {g.kernel}); "
                             f"use one of {', '.join(l.schemes)}")
        r = full_rank(g, e.k, e.scheme)
        if e.rank > r:
            raise UsageError(f"the plan's rank {e.rank} for {l.name!r} exceeds the full rank {r} "
                             f"of k={e.k}, {e.scheme}")
        check_factors(plan, l, e)
        out[l.name] = (e.k, e.scheme, e.rank, e.name)
    return out
