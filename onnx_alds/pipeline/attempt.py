"""The typed results the stages hand on: a :class:`Choice` (what was selected), a :class:`Built`
model, and an :class:`Attempt` (a choice built, checked and measured).  Policies decide on these
fields; the report they carry is written for the user and never read back to steer."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from ..plan import Plan
from ..report import Report
from ..validate import Validation


@dataclass
class Built:
    """A rewritten model and each decomposed layer's measured error."""

    model: onnx.ModelProto
    measured: dict
    factors: dict | None = None  # data-aware factors (the plan carries them)
    key: tuple | None = None  # the configurations and refit it was built from (:func:`build_key`)
    judged: Validation | None = None  # its outputs against the original's on the validation inputs, where judged
    score: float | None = None  # its task metric (--metric-script), where judged already


def build_key(choices: dict, sequential: bool) -> tuple:
    """What a build depends on within one run: each decomposed layer's configuration and the refit."""
    return tuple(sorted((n, c.k, c.scheme, c.rank) for n, c in choices.items() if c is not None)) + (sequential,)


@dataclass
class Choice:
    """A selection (or a plan applied as given): each candidate layer's configuration (None: kept),
    the plan, the report's budget section (written as the attempt goes, for the user), the
    baselines' objective at the same budget, and the method that made it."""

    choices: dict
    plan: Plan
    budget: dict
    baselines: dict = field(default_factory=dict)
    method: str = "alds"
    unchanged: bool = False  # no layer decomposed on purpose (the default budget's last resort)
    predicted_ms: float | None = None  # a latency budget: what the table predicts for this selection
    built: Built | None = None  # already built (objective "best" builds its candidates)

    @property
    def decomposed(self) -> bool:
        return any(c is not None for c in self.choices.values())


@dataclass
class LatencyMeasurement:
    """The whole model's latency before and after, timed side by side with a latency table's
    settings."""

    before_ms: float
    after_ms: float
    threads: int

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms if self.after_ms > 0 else float("nan")

    def to_budget(self) -> dict:
        return {"threads": self.threads, "measured_ms_before": self.before_ms, "measured_ms": self.after_ms,
                "measured_speedup": self.speedup}


@dataclass
class Attempt:
    """A choice built, checked, measured and validated; ``report`` is what the user reads."""

    choice: Choice
    built: Built
    report: Report
    validation: Validation | None = None
    latency: LatencyMeasurement | None = None  # --keep-latency: the closed loop's measurement

    @property
    def model(self) -> onnx.ModelProto:
        return self.built.model

    @property
    def speedup(self) -> float | None:
        """Validation's measured speed-up (None without validation or timing)."""
        return self.validation.speedup if self.validation is not None else None

    @property
    def rel_l2(self) -> float:
        """Validation's worst output relative L2 (0 without validation)."""
        return float(self.validation.rel_l2) if self.validation is not None else 0.0
