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
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError
from .folding import SCHEMES

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

    def save(self, path) -> list[Path]:
        """Write the plan (and its factors sidecar, when it carries factors); returns the paths."""
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
        import hashlib
        import io as _io

        import numpy as np

        from .ops.base import Factors

        if not isinstance(ref, dict) or not isinstance(ref.get("file"), str):
            raise UsageError("the plan's 'factors' entry needs a 'file'")
        side = base / Path(ref["file"]).name  # beside the plan, never elsewhere
        try:
            data = side.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read the plan's factors file {str(side)!r}: {e.strerror or e}") from None
        if ref.get("sha256") and hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise UsageError(f"the plan's factors file {str(side)!r} does not match the plan (SHA-256 differs)")
        try:
            with np.load(_io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception:
            raise UsageError(f"the plan's factors file {str(side)!r} is not a valid .npz") from None
        factors = {}
        for l in self.layers:
            try:
                factors[l.name] = Factors(arrays[f"{l.name}|encoder"], arrays[f"{l.name}|decoder"],
                                          arrays.get(f"{l.name}|bias_delta"))
            except KeyError:
                raise UsageError(f"the plan's factors file has no factors for layer {l.name!r}") from None
        self.factors = factors

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
        out[l.name] = (e.k, e.scheme, e.rank, e.name)
    return out
