"""BatchNorm put back after factorized convolutions for the length of a fine-tune, then folded away.

A plan refers to BatchNorm-folded weights, so a compressed network has no
BatchNorm left, and deep BN-free networks fine-tune badly (ResNet20 on digits
diverged at lr 0.01-0.02 without it). :func:`insert` puts a BatchNorm after
every :class:`~onnx_alds.torch.modules.FactorizedConv` and after every other
convolution with a bias (where a folded BatchNorm went), initialised to the
identity in eval mode (running statistics ``μ, σ²`` of the layer's outputs on
calibration batches, ``γ = sqrt(σ² + eps)``, ``β = μ``), in place.
:func:`fold` folds each one back into its (decoder) conv::

    W' = W · γ / sqrt(σ² + eps)        b' = (b - μ) · γ / sqrt(σ² + eps) + β

so the module ends with the plan's structure and parameter count again.
Before folding, :func:`recalibrate` replaces the running statistics, an
exponential average over the last few dozen steps of moving weights, by the
statistics of the final weights on calibration batches (one pass in training
mode, averaged over every batch, as BatchNorm re-estimation is usually
done): after a short
fine-tune (one epoch of ResNet20 on digits is 22 steps) the average still
remembers the start, and the folded model is off by that much.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .modules import FactorizedConv

__all__ = ["FactorizedConvBN", "ConvBN", "insert", "with_batchnorm", "recalibrate", "fold", "needs_batchnorm"]


class FactorizedConvBN(nn.Sequential):
    """``Sequential(FactorizedConv, BatchNorm)`` inserted by :func:`insert` (state-dict keys ``0.*``, ``1.*``,
    as :func:`onnx_alds.torch.with_batchnorm` writes them)."""


class ConvBN(nn.Sequential):
    """``Sequential(Conv, BatchNorm)`` after a plain convolution whose BatchNorm was folded into its bias:
    the layers the plan left dense are BN-free too, and at the fine-tune's learning rate a network of which
    only the factorized half has BatchNorm loses accuracy instead of recovering it (ResNet20 at keep-params
    0.5 on digits: 98.9 % one-shot, 97.1 % after 5 epochs without, see README)."""


def _identity_bn(conv: nn.Module, mean, var) -> nn.Module:
    """A BatchNorm for ``conv``'s outputs that is the identity in eval mode on outputs of that mean and variance."""
    f = conv.out_channels
    bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[conv.weight.dim()](f)
    bn.running_mean.copy_(mean.float())
    bn.running_var.copy_(var.float())
    bn.weight.copy_(torch.sqrt(var.float() + bn.eps))
    bn.bias.copy_(mean.float())
    return bn.to(conv.weight.device)


def _last_conv(mod: nn.Module) -> nn.Module:
    """The conv whose outputs a BatchNorm after ``mod`` normalises (and folds into)."""
    return mod.decoder if isinstance(mod, FactorizedConv) else mod


def plain_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions outside the factorized layers that have a bias (where a folded BatchNorm went)."""
    inside = {n for n, m in model.named_modules() if isinstance(m, FactorizedConv)}
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.bias is not None
            and not any(n.startswith(p + ".") for p in inside)]


def needs_batchnorm(model: nn.Module) -> bool:
    """True when the model has factorized convolutions and no BatchNorm at all (its BN was folded)."""
    mods = list(model.modules())
    return any(isinstance(m, FactorizedConv) for m in mods) and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods)


@torch.no_grad()
def insert(model: nn.Module, calibration: Iterable, forward, plain: bool = True) -> int:
    """Insert identity BatchNorms in place (see the module docstring); returns how many.

    ``calibration`` yields model inputs; ``forward(model, x)`` runs the model on one.  With ``plain``
    the convolutions the plan left dense get one too (:class:`ConvBN`).
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedConv)]
    if not targets:
        return 0
    if plain:
        targets += plain_convs(model)
    sums = {n: [0.0, 0.0, 0] for n, _ in targets}

    def hook(name):
        def fn(_mod, _inp, out):
            dims = [d for d in range(out.dim()) if d != 1]
            acc = sums[name]
            acc[0] = acc[0] + out.double().sum(dims)
            acc[1] = acc[1] + out.double().pow(2).sum(dims)
            acc[2] += out.numel() // out.shape[1]

        return fn

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    try:
        for x in calibration:
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, mod in targets:
        s, sq, n = sums[name]
        if n == 0:
            raise ValueError("BatchNorm calibration saw no batches")
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0.0)
        wrap = FactorizedConvBN if isinstance(mod, FactorizedConv) else ConvBN
        model.set_submodule(name, wrap(mod, _identity_bn(_last_conv(mod), mean, var)))
    return len(targets)


def with_batchnorm(model: nn.Module, calibration_x) -> nn.Module:
    """A copy of ``model`` with a BatchNorm after every factorized convolution, identity in eval mode.

    Running mean/variance come from the factorized layer's outputs on
    ``calibration_x`` (in eval mode, 256 samples a pass), and ``weight = sqrt(var + eps)``,
    ``bias = mean``, so the eval-mode function is unchanged; in train mode the
    layer normalizes with batch statistics as the original network did.
    :func:`onnx_alds.torch.export` folds each one into its decoder conv.
    (``finetune`` calls :func:`insert`, which puts one after the dense convolutions too.)
    """
    model = copy.deepcopy(model).eval()
    insert(model, (calibration_x[i : i + 256] for i in range(0, len(calibration_x), 256)),
           lambda m, x: m(x), plain=False)
    return model.eval()


@torch.no_grad()
def recalibrate(model: nn.Module, calibration: Iterable, forward) -> int:
    """Set the running statistics of every inserted BatchNorm to the mean and
    variance of its input averaged over every batch of ``calibration`` (model
    inputs; the BatchNorms normalise by batch statistics during the pass, the
    rest of the model is in eval mode); returns how many."""
    bns = [m[1] for m in model.modules() if isinstance(m, (FactorizedConvBN, ConvBN))]
    if not bns:
        return 0
    was_training = model.training
    saved = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over every batch
        bn.train()
    try:
        for x in calibration:
            forward(model, x)
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        model.train(was_training)
    return len(bns)


@torch.no_grad()
def fold(model: nn.Module) -> int:
    """Fold every :class:`FactorizedConvBN` back into its decoder conv and every
    :class:`ConvBN` into its conv, in place; returns how many."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedConvBN, ConvBN))]
    for name, seq in found:
        conv, bn = seq[0], seq[1]
        dec = _last_conv(conv)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shape = (-1,) + (1,) * (dec.weight.dim() - 1)
        dec.weight.mul_(scale.reshape(shape))
        bias = dec.bias if dec.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * scale + bn.bias
        if dec.bias is None:
            dec.bias = nn.Parameter(new_bias.detach().clone())
        else:
            dec.bias.copy_(new_bias)
        model.set_submodule(name, conv)
    return len(found)
