"""One spec per operator kind (see :mod:`onnx_alds.ops.base`).

``SPECS`` maps an ONNX op type to the spec that compresses it.
"""

from __future__ import annotations

from . import conv, convtranspose, gemm, matmul
from .base import Classified, Factors, LayerAttrs, OpSpec, constant_value, has_bias, known

SPECS: dict[str, OpSpec] = {s.op: s for s in (conv.SPEC, gemm.SPEC, matmul.SPEC, convtranspose.SPEC)}


def spec_for(op: str) -> OpSpec:
    return SPECS[op]


__all__ = ["SPECS", "spec_for", "OpSpec", "Classified", "Factors", "LayerAttrs",
           "constant_value", "has_bias", "known"]
