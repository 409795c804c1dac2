"""Exact parameter and multiply-accumulate counts of a factorized layer.

The counts match the emitted graph: the encoder is a grouped conv with
``k·j`` outputs and kernel ``e`` (``j·c·|e|`` weights), the decoder a dense
conv with kernel ``d`` over ``k·j`` channels (``f·k·j·|d|`` weights).  The
encoder of s0 runs at the output resolution, s1 at (H_in, W_out), s2 at
(H_out, W_in) and s3 at the input resolution; the decoder at the output
resolution, except where ``decoder_spatial`` says otherwise (a transposed
conv counts its MACs per input position, but its s0 decoder, a 1×1 conv
after the transposed encoder, runs at the upsampled output).  Biases are unchanged and are
not part of a layer's cost.  The cost models at the end give the selector
the cost of every configuration under one budget metric.  Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .folding import decoder_kernel, encoder_kernel


@dataclass(frozen=True)
class Geometry:
    """What the cost of a layer depends on (a linear layer has kernel (1, 1))."""

    f: int
    c: int
    kernel: tuple[int, int]
    in_spatial: tuple[int, int] | None  # (H_in, W_in); for linear layers (tokens, 1)
    out_spatial: tuple[int, int] | None  # (H_out, W_out)
    decoder_spatial: tuple[int, int] | None = None  # where a 1×1 (s0) decoder runs, when not out_spatial

    @property
    def params(self) -> int:
        return self.f * self.c * prod(self.kernel)

    @property
    def flops(self) -> int | None:
        if self.out_spatial is None:
            return None
        return self.params * prod(self.out_spatial)


def factorized_params(g: Geometry, k: int, scheme: str, rank: int) -> int:
    e = prod(encoder_kernel(scheme, g.kernel))
    d = prod(decoder_kernel(scheme, g.kernel))
    return rank * (g.c * e + g.f * k * d)


def encoder_spatial(g: Geometry, scheme: str) -> tuple[int, int]:
    (hi, wi), (ho, wo) = g.in_spatial, g.out_spatial
    return {"s0": (ho, wo), "s1": (hi, wo), "s2": (ho, wi), "s3": (hi, wi)}[scheme]


def factorized_flops(g: Geometry, k: int, scheme: str, rank: int) -> int | None:
    if g.out_spatial is None or g.in_spatial is None:
        return None
    e = prod(encoder_kernel(scheme, g.kernel))
    d = prod(decoder_kernel(scheme, g.kernel))
    dec = g.decoder_spatial if scheme == "s0" and g.decoder_spatial is not None else g.out_spatial
    return rank * (g.c * e * prod(encoder_spatial(g, scheme)) + g.f * k * d * prod(dec))


def full_rank(g: Geometry, k: int, scheme: str) -> int:
    """Rank of one group's folded matrix, the largest useful rank."""
    k1, k2 = g.kernel
    cg = g.c // k
    rows, cols = {
        "s0": (g.f, cg * k1 * k2),
        "s1": (g.f * k1, k2 * cg),
        "s2": (g.f * k2, k1 * cg),
        "s3": (g.f * k1 * k2, cg),
    }[scheme]
    return min(rows, cols)


# ----------------------------------------------------------------------------- cost models

class CostModel:
    """What a configuration of a layer costs under one budget metric.

    ``dense(layer)`` is the layer's own cost, ``configs(layer, k, scheme,
    ranks)`` the cost of each rank (an array), ``total(info)`` the model's
    whole cost in the same unit (layers that are not candidates included)."""

    name = ""

    def dense(self, layer) -> float:
        raise NotImplementedError

    def configs(self, layer, k: int, scheme: str, ranks):
        raise NotImplementedError

    def total(self, info) -> float:
        raise NotImplementedError


class ParamsCost(CostModel):
    """Parameters: ``j·(c·|e| + f·k·|d|)`` against ``f·c·κ1·κ2``."""

    name = "params"

    def dense(self, layer):
        return float(layer.geometry.params)

    def configs(self, layer, k, scheme, ranks):
        return np.asarray(ranks) * float(factorized_params(layer.geometry, k, scheme, 1))

    def total(self, info):
        return float(info.params_total)


class FlopsCost(CostModel):
    """Multiply-accumulates at the analysed input shape."""

    name = "flops"

    def dense(self, layer):
        return float(layer.geometry.flops)

    def configs(self, layer, k, scheme, ranks):
        return np.asarray(ranks) * float(factorized_flops(layer.geometry, k, scheme, 1))

    def total(self, info):
        return float(info.flops_total)


class LatencyCost(CostModel):
    """Measured milliseconds on one provider (:class:`onnx_alds.latency.LatencyTable`)."""

    name = "latency"

    def __init__(self, table):
        self.table = table

    def dense(self, layer):
        return float(self.table.layers[layer.name].orig_ms)

    def configs(self, layer, k, scheme, ranks):
        return np.asarray(self.table.layers[layer.name].cost(k, scheme, ranks), dtype=float)

    def total(self, info):
        return float(self.table.model_ms)


def cost_model(metric: str, latency_table=None) -> CostModel:
    if metric == "params":
        return ParamsCost()
    if metric == "flops":
        return FlopsCost()
    return LatencyCost(latency_table)
