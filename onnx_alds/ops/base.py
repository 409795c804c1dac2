"""What every operator spec provides, and the helpers they share.

A spec knows everything about one ONNX operator kind that the pass touches
(onnxscript's rewriter keeps one rule per object in the same way).  Every
stage asks the spec; none of them knows an operator:

* ``classify(node, w, in_dims, out_dims)`` — may this node be compressed?
  Returns a :class:`Classified` with the layer's geometry and emission
  attributes, or the reason it stays as it is (a sentence for the report);
* ``weight4(w, attrs)`` — the stored weight viewed as ``f × c × κ1 × κ2``;
* ``schemes(kernel)`` — the foldings that give distinct factorizations;
  ``allow_groups(attrs)`` — whether channel groups (k > 1) may be used;
* ``node_flops(node, shapes)`` — multiply-accumulates of the dense node;
* ``calibration_tap(layer)`` — which tensor calibration captures and how it
  unfolds into the patches X that ``fold_s0(weight4)`` multiplies (see the
  method for the contract); data-aware errors, factors, bias correction and
  the sequential refit all read these patches;
* ``emit(layer, node, cfg, factors, names)`` — the nodes that replace it
  (``cfg`` has ``k``, ``scheme``, ``rank``; ``names`` makes fresh names);
* ``standalone(layer, in_dims, opset)`` — the layer alone as a model, for
  latency timing (``emit`` on it gives the factorized twin);
* ``torch_types()`` — the ``nn.Module`` classes it takes;
  ``torch_weight4(module)`` — a module's weight as ``f × c × κ1 × κ2``;
  ``torch_scheme(scheme)`` — the scheme the torch twin factorizes with;
  ``torch_module(module, layer_plan, factors)`` — the factorized
  ``nn.Module`` that computes what ``emit`` computes, an instance of
  ``torch_factorized_type()``.

Adding an operator is one new file in this package plus its entry in
``ops.SPECS``; ``tests/test_matrix.py`` then needs a small test graph for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import Geometry
from ..factorize import Factors  # noqa: F401 - the numeric core owns it; specs build it

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class LayerAttrs:
    """How a layer is computed, beyond its weight: what emission needs."""

    spatial_rank: int = 0  # 1, 2 or 3 for Conv, 0 for linear layers
    strides: tuple[int, ...] = (1, 1)  # one per spatial axis (a 1-D conv keeps the 2-D form, axis 2 of size 1)
    dilations: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)  # (begin of each axis, then end of each axis)
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER are kept as such by the emitter
    activation_rank: int | None = None  # rank of a linear layer's input, when known
    alpha: float = 1.0
    beta: float = 1.0
    trans_b: int = 0
    output_padding: tuple[int, int] = (0, 0)  # ConvTranspose
    output_shape: tuple[int, ...] | None = None  # ConvTranspose: pads then follow from it


@dataclass(frozen=True)
class Classified:
    """The outcome of ``OpSpec.classify``: a geometry, or a reason to skip."""

    reason: str | None = None
    geometry: Geometry | None = None
    attrs: LayerAttrs = field(default_factory=LayerAttrs)


@dataclass(frozen=True)
class Tap:
    """What calibration captures of one layer, and how it unfolds (see
    :meth:`OpSpec.calibration_tap`; ``calibration.patches`` does the unfolding)."""

    name: str  # layer name (key of the result)
    input: str  # name of the tensor that is the layer's activation input in the graph
    kind: str  # "conv", "convtranspose" or "linear"
    kernel: tuple[int, ...] = (1, 1)  # the real kernel: κ1, κ2 (a 1-D conv has κ2 = 1), or κt, κh, κw
    strides: tuple[int, ...] = (1, 1)  # one per kernel axis
    dilations: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)  # (begin of each axis, then end of each axis)
    auto_pad: str = "NOTSET"  # SAME_UPPER / SAME_LOWER: pads are computed from the actual input size
    spatial_rank: int = 2  # 1, 2 or 3 for conv (input N×C×L, N×C×H×W or N×C×T×H×W), 0 for linear
    channels: int = 0  # c (input channels / in_features)
    output_padding: tuple[int, int] = (0, 0)  # convtranspose: extra output rows/cols at the end

    @property
    def d(self) -> int:
        """Length of one patch (0 while ``channels`` is unknown)."""
        from math import prod

        return self.channels * prod(self.kernel) if self.kind != "linear" else self.channels


def constant_value(t: gs.Tensor):
    """The numpy value of a tensor that is an initializer or a Constant node's output."""
    if isinstance(t, gs.Constant):
        return t.values
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return v.values
    return None


def constant_bias(layer, t: gs.Tensor) -> np.ndarray:
    """The value of the bias ``t`` that a bias correction adds to, in float64; a bias whose value is not
    known here is an error, never a NaN in the written model."""
    v = constant_value(t)
    if v is None:
        raise ValueError(f"the bias {t.name!r} of layer {layer.name!r} is not a constant here, so the bias "
                         f"correction cannot be folded into it")
    return np.asarray(v, np.float64)


def known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and bool(node.inputs[2].name)


class OpSpec:
    """Base class; see the module docstring."""

    op: str = ""
    torch_types: Callable[[], tuple] = staticmethod(lambda: ())
    bias_input: bool = False  # input 2 is a bias that the decoder takes over

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

    def calibration_tap(self, layer) -> Tap | None:
        """What calibration captures for ``layer`` and how it unfolds, or None
        when data-aware errors do not apply (the layer then keeps its weight
        under ``--error data``).

        The contract every spec keeps: with ``Wm = weight4(w).reshape(f, d)``
        (fold s0, ``d = c·κ1·κ2``, column order channel, kernel row, kernel
        col; a 3-D conv's ``κ2`` is ``κh·κw``, so the order is channel, κt,
        κh, κw) and X the patches of the captured tensor (one column per output
        position), the layer's output without bias is ``Wm X``.  Then the
        data-aware error ``‖(W − Ŵ) X‖_F / ‖W X‖_F`` is the relative output
        error of the emitted layer, exactly, and it needs only ``G = X Xᵀ``.

        * Conv: x is the zero-padded input window of one output position,
          with the conv's strides and dilations.
        * Gemm/MatMul: x is one row of the input reshaped to ``(-1, c)``.

        This base implementation covers those two (``attrs.spatial_rank``
        tells them apart); other operators override it."""
        g, a = layer.geometry, layer.attrs
        common = dict(name=layer.name, input=layer.input_name, channels=int(g.c))
        if a.spatial_rank:
            return Tap(kind="conv", kernel=tuple(g.kernel), strides=tuple(a.strides),
                       dilations=tuple(a.dilations), pads=tuple(a.pads), auto_pad=a.auto_pad,
                       spatial_rank=a.spatial_rank, **common)
        return Tap(kind="linear", spatial_rank=0, **common)

    def channel_addend_shape(self, layer) -> tuple[int, ...]:
        """The shape of a per-output-channel addend to the layer's output (a bias correction added after
        the node, as :mod:`onnx_alds.sensitivity`'s probe adds it): ``(f, 1, …)`` over a convolution's
        spatial axes (output ``N × f × …``), ``(f,)`` for Gemm/MatMul (channels last).  Read off
        ``attrs.spatial_rank`` as :meth:`calibration_tap` is; an operator with its channels elsewhere
        overrides it."""
        return (int(layer.geometry.f),) + (1,) * int(layer.attrs.spatial_rank or 0)

    def classify(self, node: gs.Node, w: np.ndarray, in_dims, out_dims) -> Classified:
        raise NotImplementedError

    def weight4(self, w: np.ndarray, attrs: LayerAttrs) -> np.ndarray:
        raise NotImplementedError

    def stored_weight(self, w4: np.ndarray, like: np.ndarray, attrs: LayerAttrs) -> np.ndarray:
        """The inverse of :meth:`weight4`: ``w4`` (f×c×κ1×κ2) in the layout of the stored weight
        ``like``.  Where ``weight4`` only moves elements (every spec here but a Gemm with alpha ≠ 1,
        which overrides this), the move is read off ``weight4`` applied to the elements' indices, so
        that a new spec needs nothing more."""
        where = self.weight4(np.arange(like.size, dtype=np.int64).reshape(like.shape), attrs)
        out = np.empty(like.size, dtype=np.asarray(w4).dtype)
        out[np.asarray(where).ravel()] = np.asarray(w4).ravel()
        return out.reshape(like.shape)

    def emit(self, layer, node: gs.Node, cfg, factors: Factors, names) -> list[gs.Node]:
        raise NotImplementedError

    def standalone(self, layer, in_dims: list[int], opset: int):
        raise NotImplementedError

    def torch_factorized_type(self) -> type:
        """The ``nn.Module`` class :meth:`torch_module` returns (the fine-tune finds factorized layers by it)."""
        raise NotImplementedError

    def torch_module(self, module, layer_plan, factors: Factors):
        raise NotImplementedError

    def allow_groups(self, attrs: LayerAttrs) -> bool:
        return True


def load_factors(encoder, decoder, enc_w, dec_w, bias, bias_delta) -> None:
    """Load a factorization into its torch twin's encoder and decoder modules: the decoder's bias (where
    it has one) is the layer's bias, zeros where the layer had none, plus the data-aware correction,
    summed in float64 before the module's own dtype."""
    import torch

    with torch.no_grad():
        encoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(enc_w)))
        decoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(dec_w)))
        if decoder.bias is not None:
            b = bias.detach().cpu().double() if bias is not None else torch.zeros(decoder.out_channels,
                                                                                 dtype=torch.float64)
            if bias_delta is not None:
                b = b + torch.from_numpy(np.asarray(bias_delta, np.float64))
            decoder.bias.copy_(b)
