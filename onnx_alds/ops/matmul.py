"""MatMul whose second input is a constant 2-D weight ``W (c × f)``:
``y = x @ W`` on activations of any rank ≥ 2.  The decoder is a MatMul
(plus an Add of the bias correction, when data-aware factors carry one);
see :mod:`onnx_alds.ops.linear` for the encoder."""

from __future__ import annotations

from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import Geometry
from .base import Classified, LayerAttrs, known
from .conv import standalone_model
from .linear import LinearSpec


class MatMulSpec(LinearSpec):
    op = "MatMul"

    def classify(self, node, w, in_dims, out_dims) -> Classified:
        if w.ndim != 2:
            return Classified(f"MatMul weight of rank {w.ndim} (a batched weight) is not supported")
        if in_dims is not None and len(in_dims) < 2:
            return Classified("MatMul on a 1-D activation is not supported")
        c, f = int(w.shape[0]), int(w.shape[1])
        attrs = LayerAttrs(activation_rank=len(in_dims) if in_dims is not None else None)
        tokens = int(prod(in_dims[:-1])) if known(in_dims) else None
        sp = (tokens, 1) if tokens is not None else None
        return Classified(None, Geometry(f, c, (1, 1), sp, sp), attrs)

    def weight4(self, w, attrs):
        return w.T[:, :, None, None]  # x @ W with W (c, f)

    def decoder(self, layer, node, z, dec_w, factors, names) -> gs.Node:
        w = gs.Constant(names.fresh(f"{layer.name}/alds_decoder.weight"), np.ascontiguousarray(dec_w.T))
        return gs.Node("MatMul", name=names.node(f"{layer.name}/alds_decoder"), outputs=list(node.outputs),
                       inputs=[z, w])

    def emit(self, layer, node, cfg, factors, names):
        nodes = super().emit(layer, node, cfg, factors, names)
        if factors.bias_delta is None:
            return nodes
        # y = decoder(z) + δ: the decoder writes a new tensor, an Add writes the layer's output
        dec = nodes[-1]
        y = gs.Variable(names.fresh(f"{layer.name}/alds_decoder_output"), dtype=node.outputs[0].dtype)
        outs = list(dec.outputs)
        dec.outputs = [y]
        delta = gs.Constant(names.fresh(f"{layer.name}/alds_bias"), factors.bias_delta.astype(factors.decoder.dtype))
        return nodes + [gs.Node("Add", name=names.node(f"{layer.name}/alds_bias_add"), inputs=[y, delta],
                                outputs=outs)]

    def standalone(self, layer, in_dims, opset):
        return standalone_model(layer, in_dims, opset, {})


SPEC = MatMulSpec()
