"""The Plan: per layer ``(name, weight, k, scheme, rank)`` plus the budget it
was solved for.  Plain data, JSON in and out; produced by the selector and
consumed by the ONNX emitter and the torch side alike."""

from __future__ import annotations

import json
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

    def to_dict(self) -> dict:
        return {"version": self.version, "budget": dict(self.budget),
                "layers": [asdict(l) for l in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path) -> None:
        from .io import atomic_write_bytes

        atomic_write_bytes(path, (self.to_json() + "\n").encode())

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
            raise UsageError("the plan has no 'layers' list")
        if not isinstance(d.get("budget", {}), dict):
            raise UsageError("the plan's 'budget' is not an object")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise UsageError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        layers = []
        for i, e in enumerate(d["layers"]):
            if not isinstance(e, dict):
                raise UsageError(f"plan entry {i} is not an object with 'name', 'k' and 'rank'")
            try:
                lp = LayerPlan(name=str(e["name"]), weight=str(e.get("weight", "")), k=int(e["k"]),
                               scheme=str(e.get("scheme", "s0")), rank=int(e["rank"]))
            except (KeyError, TypeError, ValueError):
                raise UsageError(f"plan entry {i} needs 'name', 'k' and 'rank'") from None
            if lp.scheme not in SCHEMES:
                raise UsageError(f"plan entry {lp.name!r} has unknown scheme {lp.scheme!r}")
            if lp.k < 1 or lp.rank < 1:
                raise UsageError(f"plan entry {lp.name!r} needs k ≥ 1 and rank ≥ 1")
            layers.append(lp)
        return cls(layers=layers, budget=dict(d.get("budget", {})))

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UsageError(f"cannot read plan file {str(path)!r}: {e.strerror or e}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise UsageError(f"plan file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
