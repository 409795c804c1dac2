"""Plain-torch model architectures and the digits data used to train them.

``MODELS`` maps a name to a :class:`ModelSpec` (factory and the input shape the
model expects, batch first). All factories default to one input channel and
ten classes, matching :func:`models.data.load_digits_split` at 16x16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .mobilenet import mobilenet_small
from .resnet import resnet20, resnet56
from .transformer import transformer_small
from .vgg import vgg_small

__all__ = ["ModelSpec", "MODELS", "INPUT_SHAPES", "build", "resnet20", "resnet56", "vgg_small",
           "mobilenet_small", "transformer_small"]

DIGITS_INPUT_SHAPE = (1, 1, 16, 16)


@dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # (batch, channels, height, width); batch is dynamic on export


MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec(resnet20, DIGITS_INPUT_SHAPE),
    "resnet56": ModelSpec(resnet56, DIGITS_INPUT_SHAPE),
    "vgg_small": ModelSpec(vgg_small, DIGITS_INPUT_SHAPE),
    "mobilenet_small": ModelSpec(mobilenet_small, DIGITS_INPUT_SHAPE),
    "transformer_small": ModelSpec(transformer_small, DIGITS_INPUT_SHAPE),
}

INPUT_SHAPES: dict[str, tuple[int, ...]] = {k: v.input_shape for k, v in MODELS.items()}


def build(name: str, **kwargs) -> nn.Module:
    """Instantiate ``MODELS[name]`` with ``kwargs`` passed to its factory."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.") from None
    return spec.factory(**kwargs)
