"""``--metric-script FILE.py[:FUNC]``: the user's own task metric judges the rewrite.

No output tolerance speaks for every task.  A saliency model whose metric is the top region of
interest lost 4.8 points of it at a relative L2 of 0.019, and 16.7 points at the default tolerance
(``docs/real-models.md``): an argmax-style metric flips on changes no distance on the outputs sees.
So, as NNCF's ``quantize_with_accuracy_control``, the user can hand over the metric itself: a
function of a model file that scores it on their own validation data, higher is better::

    def evaluate(model_path: str) -> float:     # e.g. accuracy in %
        sess = onnxruntime.InferenceSession(model_path)
        ...

and the largest drop from the original's score they accept, ``--max-metric-drop`` (in the metric's
own units; default 1 % of the original's score).  With no budget given, the default search then
looks for the smallest plan whose score drops at most that much (:mod:`onnx_alds.policy.error_bounded`);
under any budget the score is in the report's validation section, and a drop past
``--max-metric-drop`` is exit 5 with nothing written.  The function sees a model file in a private
temporary directory (over 2 GB with its external data beside it); it is called once for the original
and once per model judged, so its data should be its own validation split, not the calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from .errors import UsageError, first_line
from .io import save_model, temp_dir
from .script import user_function

DEFAULT_FUNCTION = "evaluate"
DEFAULT_RELATIVE_DROP = 0.01  # without --max-metric-drop: 1 % of the original's score


@dataclass
class TaskMetric:
    """The user's metric (``fn(model_path) -> float``, higher is better) and the drop allowed."""

    fn: Callable[[str], float]
    name: str  # the script as given, for messages and the report
    max_drop: float | None = None  # as given (in the metric's units); None: DEFAULT_RELATIVE_DROP of the original
    original: float | None = None
    calls: int = 0

    @classmethod
    def from_option(cls, metric, max_drop: float | None = None) -> "TaskMetric | None":
        """A callable, or ``FILE.py[:FUNC]`` (``evaluate`` unless named), as a metric; None for None."""
        if metric is None:
            return None
        if callable(metric):
            return cls(metric, getattr(metric, "__name__", "metric"), max_drop)
        return cls(user_function(metric, "--metric-script", DEFAULT_FUNCTION), str(metric), max_drop)

    @property
    def allowed_drop(self) -> float:
        return self.max_drop if self.max_drop is not None else DEFAULT_RELATIVE_DROP * abs(self.original or 0.0)

    def score(self, model) -> float:
        """The metric of ``model`` (a ModelProto, written to a private temporary file, or a path)."""
        with temp_dir("onnx-alds-metric-") as tmp:
            path = Path(model) if not isinstance(model, onnx.ModelProto) else Path(tmp) / "model.onnx"
            if isinstance(model, onnx.ModelProto):
                save_model(model, path)
            try:
                value = self.fn(str(path))
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 - the user's function failed: one sentence, not our traceback
                raise UsageError(f"--metric-script {self.name!r} failed: {type(e).__name__}: {first_line(e)}") \
                    from None
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"--metric-script {self.name!r} returned {value!r}, not a number") from None
        if not math.isfinite(v):
            raise UsageError(f"--metric-script {self.name!r} returned {v}, not a finite number")
        self.calls += 1
        return v

    def measure_original(self, model) -> float:
        self.original = self.score(model)
        return self.original

    def drop(self, value: float) -> float:
        return float(self.original) - value

    def ok(self, value: float) -> bool:
        return self.drop(value) <= self.allowed_drop

    def to_dict(self, value: float) -> dict:
        return {"script": self.name, "original": self.original, "rewritten": value, "drop": self.drop(value),
                "max_drop": self.allowed_drop, "max_drop_given": self.max_drop is not None, "calls": self.calls}

    def describe(self, value: float) -> str:
        return (f"the metric of --metric-script {self.name!r} is {value:.4g} against the original's "
                f"{self.original:.4g} (a drop of {self.drop(value):.3g}")
