"""Apply a Plan to an ``nn.Module``: each planned Conv/Linear becomes a
factorized module that computes exactly what the emitted ONNX subgraph
computes (the same factors, from :func:`onnx_alds.factorize.factorize`).

Conv ``W`` with ``(k, scheme, j)``:  ``encoder`` = Conv(c → k·j, group k, no
bias), ``decoder`` = Conv(k·j → f, bias of the original); each kernel axis
(with its stride, dilation and padding) sits in the conv that holds it in the
scheme.  Linear: ``x (…, c) → (…, k, c/k) → einsum with (k, c/k, j) → (…, k·j)
→ Linear(k·j → f)``.

BatchNorm is folded first (give ``example_inputs``) because the ONNX export
folds it: a plan's ranks refer to the folded weights.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ..factorize import factorize
from ..plan import LayerPlan, Plan
from .export import fold_batchnorm, weight_to_module

_AXIS_OWNER = {"s0": ("enc", "enc"), "s1": ("dec", "enc"), "s2": ("enc", "dec"), "s3": ("dec", "dec")}


def _per_axis(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class FactorizedConv(nn.Module):
    """Encoder (grouped) conv followed by a decoder conv; see the module docstring."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, k: int, scheme: str, rank: int):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("grouped convolutions are not factorized")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only explicit zero padding is supported")
        nsp = conv.weight.dim() - 2
        if nsp == 1 and scheme in ("s1", "s2"):
            raise ValueError(f"scheme {scheme} needs a 2-D kernel")
        self.k, self.scheme, self.rank = k, scheme, rank
        w = conv.weight.detach().cpu().numpy()
        enc_w, dec_w = factorize(w, scheme, k, rank)
        if nsp == 1:
            enc_w, dec_w = enc_w[..., 0], dec_w[..., 0]
        owner = _AXIS_OWNER[scheme][:nsp]
        stride, dil, pad = (_per_axis(v, nsp) for v in (conv.stride, conv.dilation, conv.padding))

        def attrs(me):
            return dict(stride=tuple(s if o == me else 1 for s, o in zip(stride, owner)),
                        dilation=tuple(d if o == me else 1 for d, o in zip(dil, owner)),
                        padding=tuple(p if o == me else 0 for p, o in zip(pad, owner)))

        cls = nn.Conv1d if nsp == 1 else nn.Conv2d
        f, c = w.shape[0], w.shape[1]
        self.encoder = cls(c, k * rank, tuple(enc_w.shape[2:]), groups=k, bias=False, **attrs("enc"))
        self.decoder = cls(k * rank, f, tuple(dec_w.shape[2:]), bias=conv.bias is not None, **attrs("dec"))
        dev, dt = conv.weight.device, conv.weight.dtype
        with torch.no_grad():
            self.encoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(enc_w)))
            self.decoder.weight.copy_(torch.from_numpy(np.ascontiguousarray(dec_w)))
            if conv.bias is not None:
                self.decoder.bias.copy_(conv.bias.detach())
        self.to(device=dev, dtype=dt)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class FactorizedLinear(nn.Module):
    """Grouped linear encoder (k groups of c/k inputs, rank j each) and a dense decoder."""

    def __init__(self, linear: nn.Linear, k: int, rank: int):
        super().__init__()
        self.k, self.scheme, self.rank = k, "s0", rank
        w = linear.weight.detach().cpu().numpy()  # (f, c)
        f, c = w.shape
        enc_w, dec_w = factorize(w, "s0", k, rank)
        enc = enc_w.reshape(k, rank, c // k).transpose(0, 2, 1)  # (k, c/k, j)
        dt = linear.weight.dtype
        self.encoder = nn.Parameter(torch.from_numpy(np.ascontiguousarray(enc)).to(dt))
        self.decoder = nn.Linear(k * rank, f, bias=linear.bias is not None)
        with torch.no_grad():
            self.decoder.weight.copy_(torch.from_numpy(dec_w.reshape(f, k * rank)))
            if linear.bias is not None:
                self.decoder.bias.copy_(linear.bias.detach())
        self.to(device=linear.weight.device, dtype=dt)

    def forward(self, x):
        if self.k == 1:
            z = x @ self.encoder[0]
        else:
            xs = x.reshape(*x.shape[:-1], self.k, x.shape[-1] // self.k)
            z = torch.einsum("...kc,kcj->...kj", xs, self.encoder).reshape(*x.shape[:-1], -1)
        return self.decoder(z)


def with_batchnorm(model: nn.Module, calibration_x) -> nn.Module:
    """A copy of ``model`` with a BatchNorm after every factorized convolution, identity in eval mode.

    Running mean/variance come from the factorized layer's outputs on
    ``calibration_x`` (in eval mode), and ``weight = sqrt(var + eps)``,
    ``bias = mean``, so the eval-mode function is unchanged; in train mode the
    layer normalizes with batch statistics as the original network did.
    :func:`onnx_alds.torch.export` folds each one into its decoder conv.

    Why: a plan refers to BatchNorm-folded weights, so a compressed network
    has no BatchNorm left, and deep BN-free ResNets fine-tune badly (on digits
    ResNet20 diverged at lr 0.01-0.02 without it, for every method).
    """
    model = copy.deepcopy(model).eval()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedConv)]
    if not targets:
        return model
    stats: dict[str, tuple] = {}
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n, _ in targets}

    def hook(name):
        def fn(_mod, _inp, out):
            dims = [d for d in range(out.dim()) if d != 1]
            n = out.numel() // out.shape[1]
            acc = sums[name]
            acc[0] = acc[0] + out.sum(dims).double()
            acc[1] = acc[1] + (out.double() ** 2).sum(dims)
            acc[2] += n

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    try:
        with torch.no_grad():
            for i in range(0, len(calibration_x), 256):
                model(calibration_x[i : i + 256])
    finally:
        for h in handles:
            h.remove()
    for name, (s, sq, n) in sums.items():
        mean = s / n
        var = (sq / n - mean**2).clamp_min(0.0)
        stats[name] = (mean.float(), var.float())
    with torch.no_grad():
        for name, mod in targets:
            mean, var = stats[name]
            f = mod.decoder.out_channels
            bn = nn.BatchNorm2d(f) if isinstance(mod.decoder, nn.Conv2d) else nn.BatchNorm1d(f)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean)
            bn.to(mod.decoder.weight.device)
            model.set_submodule(name, nn.Sequential(mod, bn))
    return model.eval()


def _module_path(model: nn.Module, entry: LayerPlan) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    for key in (entry.weight, entry.name):
        if not key:
            continue
        try:
            return names[id(weight_to_module(model, key))]
        except KeyError:
            continue
    raise KeyError(f"the plan's layer {entry.name!r} (weight {entry.weight!r}) matches no module of the model")


def apply_plan(model: nn.Module, plan: Plan | dict | str, example_inputs: Any = None) -> nn.Module:
    """A copy of ``model`` with every layer of ``plan`` factorized.

    ``example_inputs`` lets BatchNorm be folded first, as the ONNX export does;
    a model with BatchNorm needs them."""
    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if example_inputs is not None:
        model = fold_batchnorm(model, example_inputs)
    else:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("the model has BatchNorm: pass example_inputs so that it is folded as in the ONNX export")
        model = copy.deepcopy(model).eval()
    for entry in plan.layers:
        path = _module_path(model, entry)
        mod = model.get_submodule(path)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            new = FactorizedConv(mod, entry.k, entry.scheme, entry.rank)
        elif isinstance(mod, nn.Linear):
            new = FactorizedLinear(mod, entry.k, entry.rank)
        else:
            raise ValueError(f"module {path!r} is a {type(mod).__name__}, not a Conv1d/Conv2d/Linear")
        model.set_submodule(path, new)
    return model
