"""``FinetuneConfig``: every setting of a fine-tune in one frozen object, checked once when it is built.

``onnx_alds.torch.finetune(model, loader, epochs=..., lr=...)`` builds one from
its keywords (or takes ``config=FinetuneConfig(...)``); the CLI builds one from
its arguments. Nothing downstream forwards settings by hand or checks them again.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from ..argtypes import MAX_THREADS
from ..errors import UsageError

__all__ = ["FinetuneConfig", "DEFAULTS", "config_from"]

LOSSES = ("kl", "mse", "cosine")  # the output-matching losses of distill.py (kept here: no torch import)

# The defaults (docs/finetune.md says how they were measured).
DEFAULTS = dict(lr=0.02, warmup=0.1, alpha=1.0, temperature=2.0, feature_weight=30.0, patience=3, weight_decay=5e-4,
                momentum=0.9, max_grad_norm=5.0)


def _number(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> None:
    """One sentence unless ``value`` is a finite real number in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        if high == math.inf:
            what = "a positive finite number" if low_open and low == 0 else f"a finite number of at least {low:g}"
        else:
            what = f"a number in {lo}{low:g}, {high:g}{hi}"
        raise UsageError(f"{name} must be {what}, not {value!r}")


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of :func:`onnx_alds.torch.finetune` (its docstring says what each one does)."""

    epochs: int = 5
    distill_loss: str = "auto"
    alpha: float = DEFAULTS["alpha"]
    temperature: float = DEFAULTS["temperature"]
    feature_weight: float | str = "auto"
    lr: float = DEFAULTS["lr"]
    warmup: float = DEFAULTS["warmup"]
    optimizer: str = "sgd"
    weight_decay: float = DEFAULTS["weight_decay"]
    momentum: float = DEFAULTS["momentum"]
    label_smoothing: float = 0.0
    max_grad_norm: float | None = DEFAULTS["max_grad_norm"]
    batchnorm: bool | str = "auto"
    patience: int | None = DEFAULTS["patience"]
    restore_best: bool = True
    threads: int | str | None = "auto"
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = True
    device: Any = None
    distributed: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`~onnx_alds.errors.UsageError` (one sentence naming the setting) for a bad value."""
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise UsageError(f"epochs must be an integer, 0 or more, not {self.epochs!r}")
        _number("lr", self.lr, low=0, low_open=True)
        _number("temperature", self.temperature, low=0, low_open=True)
        _number("warmup", self.warmup, low=0, high=1, high_open=True)
        _number("alpha", self.alpha, low=0, high=1)
        _number("weight_decay", self.weight_decay, low=0)
        _number("momentum", self.momentum, low=0, high=1, high_open=True)
        _number("label_smoothing", self.label_smoothing, low=0, high=1, high_open=True)
        if self.max_grad_norm is not None:
            _number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        if self.feature_weight != "auto":
            _number("feature_weight", self.feature_weight, low=0)
        if str(self.optimizer).lower() not in ("sgd", "adamw"):
            raise UsageError(f"optimizer must be 'sgd' or 'adamw', not {self.optimizer!r}")
        if not (self.batchnorm is True or self.batchnorm is False or self.batchnorm == "auto"):
            raise UsageError(f"batchnorm must be 'auto', True or False, not {self.batchnorm!r}")
        if self.distill_loss != "auto" and self.distill_loss not in LOSSES:
            raise UsageError(f"distill_loss must be 'auto' or one of {', '.join(LOSSES)}, not {self.distill_loss!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise UsageError(f"patience must be an integer of at least 1, or None, not {self.patience!r}")
        if not (self.threads is None or self.threads == "auto"
                or (isinstance(self.threads, int) and not isinstance(self.threads, bool)
                    and 1 <= self.threads <= MAX_THREADS)):
            raise UsageError(f"threads must be 'auto', None or an integer from 1 to {MAX_THREADS}, not {self.threads!r}")


_NAMES = frozenset(f.name for f in fields(FinetuneConfig))


def config_from(config: FinetuneConfig | None, options: dict[str, Any]) -> FinetuneConfig:
    """``config`` (default: the defaults) with ``options`` (keyword settings) on top, checked once."""
    unknown = sorted(set(options) - _NAMES)
    if unknown:
        raise TypeError(f"finetune() got an unexpected keyword argument {unknown[0]!r} (settings: "
                        f"{', '.join(sorted(_NAMES))})")
    if config is not None and not isinstance(config, FinetuneConfig):
        raise UsageError(f"config must be a FinetuneConfig, not {type(config).__name__}")
    if config is None:
        return FinetuneConfig(**options)
    return replace(config, **options) if options else config
