"""What every operator spec provides, and the helpers they share.

A spec knows everything about one ONNX operator kind that the pass touches
(onnxscript's rewriter keeps one rule per object in the same way):

* ``classify(node, ctx)`` — may this node be compressed?  Returns a
  :class:`Classified` with the layer's geometry and emission attributes, or
  the reason it stays as it is (a sentence that travels to the report);
* ``weight4(w, attrs)`` — the stored weight viewed as ``f × c × κ1 × κ2``;
* ``emit(layer, node, cfg, factors, names)`` — the nodes that replace it
  (``cfg`` has ``k``, ``scheme``, ``rank``; ``names`` makes fresh names);
* ``standalone(layer, in_dims, opset)`` — the layer alone as a model, for
  latency timing (``emit`` on it gives the factorized twin);
* ``torch_module(module, factors)`` — the factorized ``nn.Module`` that
  computes what ``emit`` computes (``torch_types`` are the modules it takes).

Adding an operator is one new file in this package plus its entry in
``ops.SPECS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import Geometry

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class LayerAttrs:
    """How a layer is computed, beyond its weight: what emission needs."""

    spatial_rank: int = 0  # 1 or 2 for Conv, 0 for linear layers
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # (begin1, begin2, end1, end2)
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER are kept as such by the emitter
    activation_rank: int | None = None  # rank of a linear layer's input, when known
    alpha: float = 1.0
    beta: float = 1.0
    trans_b: int = 0


@dataclass(frozen=True)
class Classified:
    """The outcome of ``OpSpec.classify``: a geometry, or a reason to skip."""

    reason: str | None = None
    geometry: Geometry | None = None
    attrs: LayerAttrs = field(default_factory=LayerAttrs)


@dataclass(frozen=True)
class Factors:
    """Encoder ``(k·j, c/k, e1, e2)`` and decoder ``(f, k·j, d1, d2)`` conv
    weights of one configuration, and an optional correction added to the
    decoder's bias (data-aware factors remove the mean output shift)."""

    encoder: np.ndarray
    decoder: np.ndarray
    bias_delta: np.ndarray | None = None


def constant_value(t: gs.Tensor):
    """The numpy value of a tensor that is an initializer or a Constant node's output."""
    if isinstance(t, gs.Constant):
        return t.values
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return v.values
    return None


def known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and bool(node.inputs[2].name)


class OpSpec:
    """Base class; see the module docstring."""

    op: str = ""
    torch_types: Callable[[], tuple] = staticmethod(lambda: ())
    bias_input: bool = False  # input 2 is a bias that the decoder takes over
    data_aware: bool = True  # input patches fold like scheme s0 (calibration taps apply)

    def node_flops(self, node: gs.Node, shapes) -> int | None:
        """Multiply-accumulates of the node at the analysed shapes (None when unknown)."""
        from math import prod

        outs = shapes.get(node.outputs[0].name) if node.outputs else None
        a = shapes.get(node.inputs[0].name)
        if not known(outs) or not known(a) or len(a) < 1:
            return None
        kdim = a[0] if node.attrs.get("transA", 0) else a[-1]
        return int(prod(outs)) * int(kdim)

    def torch_weight4(self, module) -> np.ndarray:
        """The torch module's weight viewed as ``f × c × κ1 × κ2``."""
        from ..folding import as_4d

        return as_4d(module.weight.detach().cpu().numpy())

    def torch_scheme(self, scheme: str) -> str:
        return scheme

    def schemes(self, kernel) -> tuple[str, ...]:
        """The foldings that give distinct factorizations of this kernel."""
        from ..folding import distinct_schemes

        return distinct_schemes(kernel)

    def classify(self, node: gs.Node, w: np.ndarray, in_dims, out_dims) -> Classified:
        raise NotImplementedError

    def weight4(self, w: np.ndarray, attrs: LayerAttrs) -> np.ndarray:
        raise NotImplementedError

    def emit(self, layer, node: gs.Node, cfg, factors: Factors, names) -> list[gs.Node]:
        raise NotImplementedError

    def standalone(self, layer, in_dims: list[int], opset: int):
        raise NotImplementedError

    def torch_module(self, module, layer_plan, factors: Factors):
        raise NotImplementedError

    def allow_groups(self, attrs: LayerAttrs) -> bool:
        return True
