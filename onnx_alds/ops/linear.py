"""Grouped linear layers (shared by the Gemm and MatMul specs).

A linear layer ``y = x Wᵀ`` (``W`` is ``f × c``) with ``(k, j)`` becomes a
grouped linear made of plain ops, never a block-diagonal dense matrix:

    x (…, c) ─ Reshape (…, k, c/k) ─ Transpose (k, …, c/k) ─ MatMul (k, c/k, j)
             ─ Transpose (…, k, j) ─ Reshape (…, k·j) ─ decoder (k·j → f) ─ y

With k = 1 it is simply ``MatMul (c, j)`` then the decoder.  Linear layers
have one folding (s0).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_graphsurgeon as gs

from .base import Factors, OpSpec


def _const_i64(name: str, values) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, dtype=np.int64))


def grouped_encoder(layer, node, k: int, rank: int, enc_w: np.ndarray, names) -> tuple[list[gs.Node], gs.Variable]:
    """The encoder nodes of a grouped linear and the tensor they produce."""
    p = layer.name
    c = layer.geometry.c
    enc_w = enc_w.reshape(k, rank, c // k)  # (k, j, cg)
    dtype = node.outputs[0].dtype
    x = node.inputs[0]

    def var(suffix):
        return gs.Variable(names.fresh(f"{p}/alds_{suffix}"), dtype=dtype)

    if k == 1:
        z = var("encoder_output")
        w = gs.Constant(names.fresh(f"{p}/alds_encoder.weight"), np.ascontiguousarray(enc_w[0].T))
        return [gs.Node("MatMul", name=names.node(f"{p}/alds_encoder"), inputs=[x, w], outputs=[z])], z
    r = layer.attrs.activation_rank
    cg = c // k
    xs, xt, zt, zs, z = (var(s) for s in ("split", "groups_first", "encoded", "groups_last", "encoder_output"))
    gw = np.ascontiguousarray(enc_w.transpose(0, 2, 1)).reshape((k,) + (1,) * (r - 2) + (cg, rank))
    nodes = [
        gs.Node("Reshape", name=names.node(f"{p}/alds_split"), outputs=[xs],
                inputs=[x, _const_i64(names.fresh(f"{p}/alds_split.shape"), [0] * (r - 1) + [k, cg])]),
        gs.Node("Transpose", name=names.node(f"{p}/alds_groups_first"), inputs=[xs], outputs=[xt],
                attrs={"perm": [r - 1] + list(range(r - 1)) + [r]}),
        gs.Node("MatMul", name=names.node(f"{p}/alds_encoder"), outputs=[zt],
                inputs=[xt, gs.Constant(names.fresh(f"{p}/alds_encoder.weight"), gw)]),
        gs.Node("Transpose", name=names.node(f"{p}/alds_groups_last"), inputs=[zt], outputs=[zs],
                attrs={"perm": list(range(1, r)) + [0, r]}),
        gs.Node("Reshape", name=names.node(f"{p}/alds_merge"), outputs=[z],
                inputs=[zs, _const_i64(names.fresh(f"{p}/alds_merge.shape"), [0] * (r - 1) + [k * rank])]),
    ]
    return nodes, z


class LinearSpec(OpSpec):
    """What Gemm and MatMul share: the grouped encoder and the torch module."""

    @staticmethod
    def torch_types():
        from torch import nn

        return (nn.Linear,)

    def torch_scheme(self, scheme: str) -> str:
        return "s0"  # linear layers have one folding

    def allow_groups(self, attrs) -> bool:
        """Grouped linear layers need the activation rank to reshape into groups."""
        return attrs.activation_rank is not None

    def decoder(self, layer, node, z, dec_w: np.ndarray, factors: Factors, names) -> gs.Node:
        raise NotImplementedError

    def emit(self, layer, node, cfg, factors: Factors, names) -> list[gs.Node]:
        f = layer.geometry.f
        nodes, z = grouped_encoder(layer, node, cfg.k, cfg.rank, factors.encoder, names)
        dec_w = factors.decoder.reshape(f, cfg.k * cfg.rank)  # (f, k·j)
        return nodes + [self.decoder(layer, node, z, dec_w, factors, names)]

    def torch_factorized_type(self) -> type:
        return torch_class()

    def torch_module(self, module, entry, factors: Factors):
        return torch_class()(module, entry.k, entry.rank, factors)


@functools.lru_cache(maxsize=None)
def torch_class():
    """``FactorizedLinear``: the torch twin of :meth:`LinearSpec.emit`."""
    import torch
    from torch import nn

    class FactorizedLinear(nn.Module):
        """Grouped linear encoder (k groups of c/k inputs, rank j each) and a dense decoder."""

        def __init__(self, linear, k: int, rank: int, factors: Factors):
            super().__init__()
            self.k, self.scheme, self.rank = k, "s0", rank
            f, c = linear.weight.shape
            enc = factors.encoder.reshape(k, rank, c // k).transpose(0, 2, 1)  # (k, c/k, j)
            dt = linear.weight.dtype
            self.encoder = nn.Parameter(torch.tensor(enc, dtype=dt))  # a copy: training never writes the plan's arrays
            with_bias = linear.bias is not None or factors.bias_delta is not None
            self.decoder = nn.Linear(k * rank, f, bias=with_bias)
            with torch.no_grad():
                self.decoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(factors.decoder.reshape(f, k * rank))))
                if with_bias:
                    b = linear.bias.detach().cpu().double() if linear.bias is not None \
                        else torch.zeros(f, dtype=torch.float64)
                    if factors.bias_delta is not None:
                        b = b + torch.from_numpy(np.asarray(factors.bias_delta, np.float64))
                    self.decoder.bias.copy_(b)
            self.to(device=linear.weight.device, dtype=dt)

        def forward(self, x):
            if self.k == 1:
                z = x @ self.encoder[0]
            else:
                xs = x.reshape(*x.shape[:-1], self.k, x.shape[-1] // self.k)
                z = torch.einsum("...kc,kcj->...kj", xs, self.encoder).reshape(*x.shape[:-1], -1)
            return self.decoder(z)

    return FactorizedLinear
