"""ConvTranspose (``group=1``, 2-D or 3-D): the adjoint of a convolution.

Its weight is stored ``c × f × κ1 × κ2`` (inputs first); viewed as
``W' = Wᵀ`` (``f × c × κ1 × κ2``, ``weight4``) it folds like a conv.  Two
foldings give a transposed conv again, because a 1×1 conv commutes with the
transposed conv's striding and padding:

    s3  W[c, f, κ] ≈ Σ_r E[r, c] · D[f, r, κ]
        x ─ Conv(E, 1×1, group=k, k·j outputs) ─ ConvTranspose(D, + bias) ─ y
    s0  W[c, f, κ] ≈ Σ_r E[r, c, κ] · D[f, r]
        x ─ ConvTranspose(E, group=k, k·j outputs) ─ Conv(D, 1×1, + bias) ─ y

Every ConvTranspose attribute (strides, pads, dilations, output_padding,
output_shape, auto_pad) stays on the transposed conv, so both are exact at
full rank.  MACs are counted per *input* position (``c·f·κ1·κ2`` each), so
the geometry's spatial sizes are the input's; the s0 decoder runs at the
output size (``Geometry.decoder_spatial``).  A 3-D ConvTranspose (the
upsampling path of a 3-D U-Net) folds its kernel as time × plane, as a 3-D
conv does (:mod:`.conv`); both schemes keep the whole kernel on the
transposed conv.

Calibration (``calibration_tap``): s0 is the folding whose data-aware error is
exact.  A ConvTranspose is a stride-1 conv, with the kernel reversed, over its
input upsampled by zeros and padded (``calibration.patches``), so its output
is ``fold_s0(W') x`` for those patches x.  Layers with ``auto_pad`` or
``output_shape`` (pads that depend on the output size) get no tap.
"""

from __future__ import annotations

import functools
from math import prod

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import Geometry
from .base import Classified, Factors, LayerAttrs, OpSpec, Tap, known, load_factors
from .conv import encoder_decoder, real_kernel, spatial_axes, standalone_model

_KEEP = ("strides", "pads", "dilations", "output_padding", "output_shape", "auto_pad", "kernel_shape")


class ConvTransposeSpec(OpSpec):
    op = "ConvTranspose"
    bias_input = True

    @staticmethod
    def torch_types():
        from torch import nn

        return (nn.ConvTranspose2d, nn.ConvTranspose3d)

    def schemes(self, kernel):
        return ("s0",) if tuple(kernel) == (1, 1) else ("s0", "s3")  # s3 folds like s0 for a 1×1 kernel

    def node_flops(self, node, shapes):
        a = shapes.get(node.inputs[0].name)
        wshape = shapes.get(node.inputs[1].name) or getattr(node.inputs[1], "shape", None)
        if not known(a) or not known(wshape):
            return None
        return int(prod(a)) * int(prod(wshape[1:]))

    def classify(self, node, w, in_dims, out_dims) -> Classified:
        if int(node.attrs.get("group", 1)) != 1:
            return Classified(f"grouped ConvTranspose (group={node.attrs['group']})")
        if w.ndim not in (4, 5):
            return Classified(f"{w.ndim - 2}-D ConvTranspose is not supported (2-D and 3-D are)")
        nsp = w.ndim - 2
        sp, up = spatial_axes(in_dims, nsp), spatial_axes(out_dims, nsp)
        shape = node.attrs.get("output_shape")
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        attrs = LayerAttrs(spatial_rank=nsp, strides=tuple(node.attrs.get("strides", [1] * nsp)),
                           dilations=tuple(node.attrs.get("dilations", [1] * nsp)),
                           pads=tuple(node.attrs.get("pads", [0] * 2 * nsp)),
                           auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
                           output_padding=tuple(node.attrs.get("output_padding", [0] * nsp)),
                           output_shape=tuple(shape) if shape else None)
        ks = tuple(int(k) for k in w.shape[2:])
        folded = ks if nsp == 2 else (ks[0], ks[1] * ks[2])
        # MACs per input position; the s0 decoder (1×1 after the transposed encoder) runs at the output size
        geo = Geometry(int(w.shape[1]), int(w.shape[0]), folded, sp, sp, decoder_spatial=up)
        return Classified(None, geo, attrs)

    def calibration_tap(self, layer) -> Tap | None:
        """The input, unfolded as the stride-1 conv with reversed kernel over
        the zero-upsampled, padded input that a ConvTranspose is (module
        docstring); then ``output = fold_s0(weight4) @ patch`` at every output
        position.  None where pads follow from ``auto_pad``/``output_shape``."""
        a = layer.attrs
        if a.auto_pad not in ("NOTSET", "") or a.output_shape is not None:
            return None
        return Tap(layer.name, layer.input_name, "convtranspose", kernel=tuple(int(k) for k in layer.weight_shape[2:]),
                   strides=tuple(a.strides), dilations=tuple(a.dilations), pads=tuple(a.pads),
                   spatial_rank=a.spatial_rank, channels=int(layer.geometry.c), output_padding=tuple(a.output_padding))

    def torch_weight4(self, module):
        return self.weight4(module.weight.detach().cpu().numpy(), None)

    def weight4(self, w, attrs):
        wt = np.ascontiguousarray(np.swapaxes(w, 0, 1))  # f × c × κ…
        return wt.reshape(wt.shape[0], wt.shape[1], wt.shape[2], -1) if wt.ndim == 5 else wt  # 3-D: κt × κh·κw

    def emit(self, layer, node, cfg, factors: Factors, names) -> list[gs.Node]:
        attrs = {k: v for k, v in node.attrs.items() if k in _KEEP}
        nsp, kernel = layer.attrs.spatial_rank, tuple(layer.weight_shape[2:])
        enc, dec = (real_kernel(w, kernel, nsp) for w in (factors.encoder, factors.decoder))
        one = {"kernel_shape": [1] * nsp}
        if cfg.scheme == "s0":  # transposed encoder (group k), 1×1 decoder
            enc_w = transposed_groups(enc, cfg.k)
            attrs.update(kernel_shape=list(enc_w.shape[2:]), group=cfg.k)
            return encoder_decoder(layer, node, factors, names, enc_w, attrs, "Conv", dec, one,
                                   enc_op="ConvTranspose")
        dec_w = np.ascontiguousarray(np.swapaxes(dec, 0, 1))  # (k·j, f, κ…): inputs first
        attrs["kernel_shape"] = list(dec_w.shape[2:])
        return encoder_decoder(layer, node, factors, names, enc, {**one, "group": cfg.k}, "ConvTranspose", dec_w,
                               attrs)

    def standalone(self, layer, in_dims, opset):
        a = layer.attrs  # the stored weight shape (c, f, κ1, κ2) is what ConvTranspose takes
        return standalone_model(layer, in_dims, opset, dict(strides=list(a.strides), dilations=list(a.dilations),
                                                            pads=list(a.pads)))

    def torch_factorized_type(self) -> type:
        return torch_class()

    def torch_module(self, module, entry, factors: Factors):
        return torch_class()(module, entry.k, entry.scheme, entry.rank, factors)


def transposed_groups(enc: np.ndarray, k: int) -> np.ndarray:
    """A conv encoder ``(k·j, c/k, κ…)`` as the weight of a ConvTranspose with
    ``group=k`` (``c × j × κ…``: input channel g·c/k + a, output g·j + r)."""
    kj, cg = enc.shape[:2]
    j = kj // k
    return np.ascontiguousarray(enc.reshape(k, j, cg, *enc.shape[2:]).transpose(0, 2, 1, *range(3, enc.ndim + 1))
                                .reshape(k * cg, j, *enc.shape[2:]))


@functools.lru_cache(maxsize=None)
def torch_class():
    """``FactorizedConvTranspose``: the torch twin of :meth:`ConvTransposeSpec.emit`."""
    from torch import nn

    class FactorizedConvTranspose(nn.Module):
        """s3: 1×1 grouped encoder, transposed decoder; s0: grouped transposed encoder, 1×1 decoder."""

        def __init__(self, conv, k: int, scheme: str, rank: int, factors: Factors):
            super().__init__()
            c, f = conv.in_channels, conv.out_channels
            nsp = conv.weight.dim() - 2
            transposed, plain = (nn.ConvTranspose2d, nn.Conv2d) if nsp == 2 else (nn.ConvTranspose3d, nn.Conv3d)
            self.k, self.scheme, self.rank = k, scheme, rank
            geo = dict(stride=conv.stride, padding=conv.padding, output_padding=conv.output_padding,
                       dilation=conv.dilation)
            with_bias = conv.bias is not None or factors.bias_delta is not None
            enc, dec = (real_kernel(w, tuple(conv.kernel_size), nsp) for w in (factors.encoder, factors.decoder))
            if scheme == "s0":
                self.encoder = transposed(c, k * rank, conv.kernel_size, groups=k, bias=False, **geo)
                self.decoder = plain(k * rank, f, 1, bias=with_bias)
                enc_w, dec_w = transposed_groups(enc, k), dec
            else:
                self.encoder = plain(c, k * rank, 1, groups=k, bias=False)
                self.decoder = transposed(k * rank, f, conv.kernel_size, bias=with_bias, **geo)
                enc_w, dec_w = enc, np.swapaxes(dec, 0, 1)
            load_factors(self.encoder, self.decoder, enc_w, dec_w, conv.bias, factors.bias_delta)
            self.to(device=conv.weight.device, dtype=conv.weight.dtype)

        def forward(self, x):
            return self.decoder(self.encoder(x))

    return FactorizedConvTranspose


SPEC = ConvTransposeSpec()
