"""Conv (``group=1``, 1-D, 2-D or 3-D): ``W (f×c×κ1×κ2)`` with configuration
``(k, scheme, j)`` becomes

    x ─ Conv(encoder, group=k, k·j outputs) ─ Conv(decoder, f outputs, + bias) ─ y

Each kernel axis, with its stride, dilation and (possibly asymmetric) pads,
goes to the conv that holds it in the scheme (s0: both in the encoder, s3:
both in the decoder, s1: axis 1 in the decoder and axis 2 in the encoder, s2
the other way round).  The encoder has no bias and no padding along the axes
it does not hold, so zero padding commutes with it and the result equals the
original convolution exactly at full rank.  ``auto_pad=SAME_UPPER/LOWER`` is
kept on both convs (an axis a conv does not hold has kernel 1 and stride 1
there, so it gets no padding), which stays exact at every input size.

A 3-D conv (``f×c×κt×κh×κw``, video and volumes) is folded as the 2-D one
with kernel axis 1 the time (or depth) axis and kernel axis 2 the plane
(``κh·κw``, kept together): ``weight4`` is ``W.reshape(f, c, κt, κh·κw)``.
So s1 is the (2+1)-D factorization of R(2+1)D (a ``1×κh×κw`` encoder, then
a ``κt×1×1`` decoder), s2 the other order, s0 a full-kernel encoder and a
``1×1×1`` decoder, s3 the reverse; the geometry counts positions as
``(T, H·W)``, which is what every MAC count needs.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from ..cost import Geometry
from .base import Classified, Factors, LayerAttrs, OpSpec, constant_bias, constant_value, has_bias, known, load_factors

# which conv (encoder or decoder) holds each kernel axis
AXIS_OWNER = {"s0": ("enc", "enc"), "s1": ("dec", "enc"), "s2": ("enc", "dec"), "s3": ("dec", "dec")}


def spatial_axes(dims, n: int):
    """The geometry's two position axes: (L, 1) for 1-D, (H, W) for 2-D, (T, H·W) for 3-D."""
    if not known(dims) or len(dims) < 2 + n:
        return None
    sp = tuple(dims[2:2 + n])
    if n == 3:
        return (sp[0], sp[1] * sp[2])
    return sp if n == 2 else (sp[0], 1)


def kernel_axes(owner: tuple[str, str], nsp: int) -> tuple[str, ...]:
    """The scheme's owner of each real kernel axis: a 1-D conv has axis 1 only, a 3-D conv's plane axes
    (h, w) both go where folded axis 2 goes."""
    return owner[:1] if nsp == 1 else owner if nsp == 2 else (owner[0], owner[1], owner[1])


def real_kernel(w: np.ndarray, kernel: tuple[int, ...], nsp: int) -> np.ndarray:
    """An encoder or decoder weight in folded form (``… × a × b``, ``b`` the folded axis 2) with the conv's
    real kernel axes: ``b`` is ``κh·κw`` or 1 for a 3-D conv, absent for a 1-D one."""
    if nsp == 1:
        return w[..., 0]
    if nsp == 3:
        kh, kw = kernel[1], kernel[2]
        return w.reshape(w.shape[:3] + ((kh, kw) if w.shape[3] == kh * kw else (1, 1)))
    return w


def conv_attrs(attrs: LayerAttrs, kernel, owner, me: str, group: int) -> dict:
    """ONNX attributes of the encoder (``me="enc"``) or decoder conv."""
    nsp = attrs.spatial_rank
    half = len(attrs.pads) // 2  # pads are (begin of each axis, end of each axis)
    strides, dil, pads_b, pads_e, ks = [], [], [], [], []
    for a in range(nsp):
        mine = owner[a] == me
        ks.append(int(kernel[a]))
        strides.append(attrs.strides[a] if mine else 1)
        dil.append(attrs.dilations[a] if mine else 1)
        pads_b.append(attrs.pads[a] if mine else 0)
        pads_e.append(attrs.pads[half + a] if mine else 0)
    if attrs.auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # stays exact when the input size changes
        return {"kernel_shape": ks, "strides": strides, "dilations": dil, "auto_pad": attrs.auto_pad, "group": group}
    return {"kernel_shape": ks, "strides": strides, "dilations": dil, "pads": pads_b + pads_e, "group": group}


class ConvSpec(OpSpec):
    op = "Conv"
    bias_input = True

    def node_flops(self, node, shapes):
        from math import prod

        outs = shapes.get(node.outputs[0].name)
        wshape = shapes.get(node.inputs[1].name) or getattr(node.inputs[1], "shape", None)
        return int(prod(outs)) * int(prod(wshape[1:])) if known(outs) and known(wshape) else None

    @staticmethod
    def torch_types():
        from torch import nn

        return (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def torch_weight4(self, module) -> np.ndarray:
        return self.weight4(module.weight.detach().cpu().numpy(), None)

    def classify(self, node, w, in_dims, out_dims) -> Classified:
        group = int(node.attrs.get("group", 1))
        if group != 1:
            kind = "depthwise" if w.shape[1] == 1 else "grouped"
            return Classified(f"{kind} conv (group={group})")
        if w.ndim not in (3, 4, 5):
            return Classified(f"{w.ndim - 2}-D conv is not supported (1-D, 2-D and 3-D are)")
        nsp = w.ndim - 2
        strides = list(node.attrs.get("strides", [1] * nsp))
        dil = list(node.attrs.get("dilations", [1] * nsp))
        pads = list(node.attrs.get("pads", [0] * 2 * nsp))
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        ksz = list(w.shape[2:])
        if auto_pad == "VALID":
            pads = [0] * 2 * nsp
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            # the factorized convs keep auto_pad; the explicit pads (at the analysed
            # size, when known) only describe the layer
            pads = [0] * 2 * nsp
            for a in range(nsp if known(in_dims) and len(in_dims) == 2 + nsp else 0):
                size = in_dims[2 + a]
                out = -(-size // strides[a])
                total = max((out - 1) * strides[a] + (ksz[a] - 1) * dil[a] + 1 - size, 0)
                small, big = total // 2, total - total // 2
                pads[a], pads[nsp + a] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        else:
            auto_pad = "NOTSET"
        if nsp == 1:
            strides, dil = strides + [1], dil + [1]
            pads = [pads[0], 0, pads[1], 0]
            ksz = ksz + [1]
        attrs = LayerAttrs(spatial_rank=nsp, strides=tuple(strides), dilations=tuple(dil), pads=tuple(pads),
                           auto_pad=auto_pad)
        folded = (ksz[0], ksz[1]) if nsp < 3 else (ksz[0], ksz[1] * ksz[2])
        geo = Geometry(int(w.shape[0]), int(w.shape[1]), folded, spatial_axes(in_dims, nsp),
                       spatial_axes(out_dims, nsp))
        return Classified(None, geo, attrs)

    def weight4(self, w, attrs):
        if w.ndim == 5:
            return w.reshape(w.shape[0], w.shape[1], w.shape[2], -1)
        return w if w.ndim == 4 else w[..., None]

    def calibration_tap(self, layer):
        tap = super().calibration_tap(layer)
        if layer.attrs.spatial_rank == 3:  # patches are taken over the real kernel axes (module docstring)
            return replace(tap, kernel=tuple(int(k) for k in layer.weight_shape[2:]))
        return tap

    def emit(self, layer, node, cfg, factors: Factors, names) -> list[gs.Node]:
        nsp, kernel = layer.attrs.spatial_rank, tuple(layer.weight_shape[2:])
        enc_w, dec_w = (real_kernel(w, kernel, nsp) for w in (factors.encoder, factors.decoder))
        owner = kernel_axes(AXIS_OWNER[cfg.scheme], nsp)
        return encoder_decoder(layer, node, factors, names, enc_w, conv_attrs(layer.attrs, enc_w.shape[2:], owner,
                                                                              "enc", cfg.k),
                               "Conv", dec_w, conv_attrs(layer.attrs, dec_w.shape[2:], owner, "dec", 1))

    def standalone(self, layer, in_dims, opset):
        a = layer.attrs
        n, half = a.spatial_rank, len(a.pads) // 2
        attrs = dict(strides=list(a.strides[:n]), dilations=list(a.dilations[:n]),
                     pads=list(a.pads[:n]) + list(a.pads[half:half + n]))
        return standalone_model(layer, in_dims, opset, attrs)

    def torch_factorized_type(self) -> type:
        return torch_class()

    def torch_module(self, module, entry, factors: Factors):
        return torch_class()(module, entry.k, entry.scheme, entry.rank, factors)


@functools.lru_cache(maxsize=None)
def torch_class():
    """``FactorizedConv``: the torch twin of :meth:`ConvSpec.emit` (torch is
    imported only here, when the torch side asks for it)."""
    from torch import nn

    def per_axis(v, n):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n

    class FactorizedConv(nn.Module):
        """Encoder (grouped) conv followed by a decoder conv, as the ONNX emission."""

        def __init__(self, conv, k: int, scheme: str, rank: int, factors: Factors):
            super().__init__()
            from ..errors import UsageError

            if conv.groups != 1:
                raise UsageError("grouped convolutions are not factorized")
            if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise UsageError("only explicit zero padding is supported")
            nsp = conv.weight.dim() - 2
            if nsp == 1 and scheme in ("s1", "s2"):
                raise UsageError(f"scheme {scheme} needs a 2-D kernel")
            self.k, self.scheme, self.rank = k, scheme, rank
            kernel = tuple(conv.weight.shape[2:])
            enc_w, dec_w = (real_kernel(w, kernel, nsp) for w in (factors.encoder, factors.decoder))
            owner = kernel_axes(AXIS_OWNER[scheme], nsp)
            stride, dil, pad = (per_axis(v, nsp) for v in (conv.stride, conv.dilation, conv.padding))

            def attrs(me):
                return dict(stride=tuple(s if o == me else 1 for s, o in zip(stride, owner)),
                            dilation=tuple(d if o == me else 1 for d, o in zip(dil, owner)),
                            padding=tuple(p if o == me else 0 for p, o in zip(pad, owner)))

            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nsp]
            f, c = conv.weight.shape[0], conv.weight.shape[1]
            with_bias = conv.bias is not None or factors.bias_delta is not None
            self.encoder = cls(c, k * rank, tuple(enc_w.shape[2:]), groups=k, bias=False, **attrs("enc"))
            self.decoder = cls(k * rank, f, tuple(dec_w.shape[2:]), bias=with_bias, **attrs("dec"))
            dev, dt = conv.weight.device, conv.weight.dtype
            load_factors(self.encoder, self.decoder, enc_w, dec_w, conv.bias, factors.bias_delta)
            self.to(device=dev, dtype=dt)

        def forward(self, x):
            return self.decoder(self.encoder(x))

    return FactorizedConv


def encoder_decoder(layer, node, factors: Factors, names, enc_w, enc_attrs: dict, dec_op: str, dec_w,
                    dec_attrs: dict, enc_op: str = "Conv") -> list[gs.Node]:
    """``x ─ enc_op(encoder) ─ dec_op(decoder, + bias) ─ y`` in place of ``node``."""
    p = layer.name
    z = gs.Variable(names.fresh(f"{p}/alds_encoder_output"), dtype=node.outputs[0].dtype)
    enc = gs.Node(enc_op, name=names.node(f"{p}/alds_encoder"), attrs=enc_attrs, outputs=[z],
                  inputs=[node.inputs[0], gs.Constant(names.fresh(f"{p}/alds_encoder.weight"), enc_w)])
    inputs = [z, gs.Constant(names.fresh(f"{p}/alds_decoder.weight"), dec_w)]
    bias = corrected_bias(layer, node, factors, names)
    if bias is not None:
        inputs.append(bias)
    dec = gs.Node(dec_op, name=names.node(f"{p}/alds_decoder"), attrs=dec_attrs, inputs=inputs,
                  outputs=list(node.outputs))
    return [enc, dec]


def corrected_bias(layer, node, factors: Factors, names):
    """The decoder's bias input: the original one, or, when the factors carry a
    correction, a new constant ``b + δ`` (extract corrects constant biases only)."""
    orig = node.inputs[2] if has_bias(node) else None
    if factors.bias_delta is None:
        return orig
    base = np.zeros(layer.geometry.f) if orig is None else constant_bias(layer, orig)
    b = base + factors.bias_delta
    return gs.Constant(names.fresh(f"{layer.name}/alds_decoder.bias"), b.astype(factors.decoder.dtype))


def standalone_model(layer, in_dims, opset, attrs):
    """The layer alone, with random weights, at a fixed input shape."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(layer.dtype)
    inits = [numpy_helper.from_array(rng.standard_normal(layer.weight_shape).astype(dtype), "w")]
    inputs = ["x", "w"]
    if layer.has_bias:
        inits.append(numpy_helper.from_array(np.zeros(layer.geometry.f, dtype), "b"))
        inputs.append("b")
    et = helper.np_dtype_to_tensor_dtype(dtype)
    g = helper.make_graph([helper.make_node(layer.op, inputs, ["y"], name="layer", **attrs)], "layer",
                          [helper.make_tensor_value_info("x", et, in_dims)],
                          [helper.make_tensor_value_info("y", et, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


SPEC = ConvSpec()
