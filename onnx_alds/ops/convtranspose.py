"""ConvTranspose (``group=1``, 2-D): the adjoint of a convolution.

Its weight is stored ``c × f × κ1 × κ2`` (inputs first); viewed as
``W' = Wᵀ`` (``f × c × κ1 × κ2``) it folds like a conv.  Only the folding
that keeps the whole kernel in the decoder (s3) gives a transposed conv
again:

    W[c, f, κ] ≈ Σ_r E[r, c] · D[f, r, κ]
    x ─ Conv(encoder, 1×1, group=k, k·j outputs) ─ ConvTranspose(decoder, D, + bias) ─ y

The 1×1 encoder commutes with the transposed conv's striding and padding, so
every ConvTranspose attribute (strides, pads, dilations, output_padding,
output_shape, auto_pad) stays on the decoder and the rewrite is exact at
full rank.  MACs are counted per *input* position (``c·f·κ1·κ2`` each), so
the geometry's spatial sizes are the input's.  Data-aware errors do not
apply (the patches of a transposed conv are not its input windows).
"""

from __future__ import annotations

import functools
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import Geometry
from .base import Classified, Factors, LayerAttrs, OpSpec, known
from .conv import encoder_decoder, standalone_model

_KEEP = ("strides", "pads", "dilations", "output_padding", "output_shape", "auto_pad", "kernel_shape")


class ConvTransposeSpec(OpSpec):
    op = "ConvTranspose"
    bias_input = True
    data_aware = False

    @staticmethod
    def torch_types():
        from torch import nn

        return (nn.ConvTranspose2d,)

    def schemes(self, kernel):
        return ("s0",) if tuple(kernel) == (1, 1) else ("s3",)  # s3 folds like s0 for a 1×1 kernel

    def node_flops(self, node, shapes):
        a = shapes.get(node.inputs[0].name)
        wshape = shapes.get(node.inputs[1].name) or getattr(node.inputs[1], "shape", None)
        if not known(a) or not known(wshape):
            return None
        return int(prod(a)) * int(prod(wshape[1:]))

    def classify(self, node, w, in_dims, out_dims) -> Classified:
        if int(node.attrs.get("group", 1)) != 1:
            return Classified(f"grouped ConvTranspose (group={node.attrs['group']})")
        if w.ndim != 4:
            return Classified(f"{w.ndim - 2}-D ConvTranspose is not supported (2-D is)")
        sp = tuple(in_dims[2:4]) if known(in_dims) and len(in_dims) == 4 else None
        attrs = LayerAttrs(spatial_rank=2, strides=tuple(node.attrs.get("strides", [1, 1])),
                           dilations=tuple(node.attrs.get("dilations", [1, 1])),
                           pads=tuple(node.attrs.get("pads", [0, 0, 0, 0])))
        # encoder and decoder both count per input position
        return Classified(None, Geometry(int(w.shape[1]), int(w.shape[0]), tuple(w.shape[2:]), sp, sp), attrs)

    def torch_weight4(self, module):
        return self.weight4(module.weight.detach().cpu().numpy(), None)

    def weight4(self, w, attrs):
        return np.ascontiguousarray(w.transpose(1, 0, 2, 3))  # f × c × κ1 × κ2

    def emit(self, layer, node, cfg, factors: Factors, names) -> list[gs.Node]:
        dec_w = np.ascontiguousarray(factors.decoder.transpose(1, 0, 2, 3))  # (k·j, f, κ1, κ2): inputs first
        attrs = {k: v for k, v in node.attrs.items() if k in _KEEP}
        attrs["kernel_shape"] = list(dec_w.shape[2:])
        return encoder_decoder(layer, node, factors, names, factors.encoder, {"kernel_shape": [1, 1], "group": cfg.k},
                               "ConvTranspose", dec_w, attrs)

    def standalone(self, layer, in_dims, opset):
        a = layer.attrs  # the stored weight shape (c, f, κ1, κ2) is what ConvTranspose takes
        return standalone_model(layer, in_dims, opset, dict(strides=list(a.strides), dilations=list(a.dilations),
                                                            pads=list(a.pads)))

    def torch_module(self, module, entry, factors: Factors):
        return torch_class()(module, entry.k, entry.rank, factors)


@functools.lru_cache(maxsize=None)
def torch_class():
    """``FactorizedConvTranspose``: the torch twin of :meth:`ConvTransposeSpec.emit`."""
    import torch
    from torch import nn

    class FactorizedConvTranspose(nn.Module):
        def __init__(self, conv, k: int, rank: int, factors: Factors):
            super().__init__()
            c, f = conv.in_channels, conv.out_channels
            self.k, self.scheme, self.rank = k, "s3", rank
            self.encoder = nn.Conv2d(c, k * rank, 1, groups=k, bias=False)
            self.decoder = nn.ConvTranspose2d(k * rank, f, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                              output_padding=conv.output_padding, dilation=conv.dilation,
                                              bias=conv.bias is not None)
            with torch.no_grad():
                self.encoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(factors.encoder)))
                self.decoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(
                    factors.decoder.transpose(1, 0, 2, 3))))
                if conv.bias is not None:
                    self.decoder.bias.copy_(conv.bias.detach())
            self.to(device=conv.weight.device, dtype=conv.weight.dtype)

        def forward(self, x):
            return self.decoder(self.encoder(x))

    return FactorizedConvTranspose


SPEC = ConvTransposeSpec()
