"""Gemm with ``transA=0``: ``Y = alpha·A·B' + beta·C`` with a constant ``B``.

``alpha`` is folded into the factors; the decoder is a Gemm that keeps ``C``
and ``beta`` (see :mod:`onnx_alds.ops.linear` for the encoder)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import Geometry
from .base import Classified, LayerAttrs, constant_bias, constant_value, has_bias, known
from .conv import standalone_model
from .linear import LinearSpec


class GemmSpec(LinearSpec):
    op = "Gemm"
    bias_input = True

    def classify(self, node, w, in_dims, out_dims) -> Classified:
        if node.attrs.get("transA", 0):
            return Classified("Gemm with transA=1 is not supported")
        if w.ndim != 2:
            return Classified("Gemm weight is not 2-D")
        attrs = LayerAttrs(trans_b=int(node.attrs.get("transB", 0)), alpha=float(node.attrs.get("alpha", 1.0)),
                           beta=float(node.attrs.get("beta", 1.0)), activation_rank=2)
        if not np.isfinite(self.weight4(w, attrs)).all():
            return Classified(f"weight times alpha={attrs.alpha:g} contains NaN or Inf")
        f, c = (w.shape[0], w.shape[1]) if attrs.trans_b else (w.shape[1], w.shape[0])
        rows = in_dims[0] if known(in_dims) and len(in_dims) == 2 else None
        sp = (int(rows), 1) if rows is not None else None
        return Classified(None, Geometry(int(f), int(c), (1, 1), sp, sp), attrs)

    def weight4(self, w, attrs):
        m = w if attrs.trans_b else w.T
        if attrs.alpha != 1.0:
            with np.errstate(over="ignore", invalid="ignore"):  # classify skips a non-finite product
                m = (m.astype(np.float64) * attrs.alpha).astype(w.dtype)
        return m[:, :, None, None]

    def stored_weight(self, w4, like, attrs):
        m = np.asarray(w4, np.float64)[:, :, 0, 0] / attrs.alpha  # weight4 scales by alpha
        return m if attrs.trans_b else m.T

    def decoder(self, layer, node, z, dec_w, factors, names) -> gs.Node:
        inputs = [z, gs.Constant(names.fresh(f"{layer.name}/alds_decoder.weight"), dec_w)]
        beta = layer.attrs.beta
        c = node.inputs[2] if has_bias(node) else None
        if factors.bias_delta is not None:
            # Y = z·Dᵀ + (beta·C + δ): one constant C' with beta 1 (extract corrects constant C only)
            base = 0.0 if c is None else beta * constant_bias(layer, c)
            c = gs.Constant(names.fresh(f"{layer.name}/alds_decoder.bias"),
                            np.asarray(base + factors.bias_delta).astype(factors.decoder.dtype))
            beta = 1.0
        if c is not None:
            inputs.append(c)
        return gs.Node("Gemm", name=names.node(f"{layer.name}/alds_decoder"), inputs=inputs,
                       outputs=list(node.outputs), attrs={"alpha": 1.0, "beta": beta, "transA": 0, "transB": 1})

    def standalone(self, layer, in_dims, opset):
        a = layer.attrs
        return standalone_model(layer, in_dims, opset, dict(transB=a.trans_b, alpha=a.alpha, beta=a.beta))


SPEC = GemmSpec()
