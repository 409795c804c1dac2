"""Apply a Plan to an ``nn.Module``: each planned Conv/Linear becomes the
factorized module of its operator spec (:mod:`onnx_alds.ops`), which computes
exactly what the emitted ONNX subgraph computes, with the same factors:
weight-only factors are recomputed from the module's weights
(:func:`onnx_alds.factorize.weight_factors`, the same function the ONNX
rewrite calls); data-aware factors come from the plan, which carries them.

BatchNorm is folded first (give ``example_inputs``) because the ONNX export
folds it: a plan's ranks refer to the folded weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..factorize import weight_factors
from ..ops import SPECS
from ..ops.conv import torch_class as _conv_class
from ..ops.linear import torch_class as _linear_class
from ..plan import LayerPlan, Plan, check_factor_arrays
from .export import fold_batchnorm, weight_to_module

FactorizedConv = _conv_class()
FactorizedLinear = _linear_class()
# every spec's factorized torch module (a new spec's too), in SPECS order without repeats (Gemm and MatMul share one)
FACTORIZED = tuple(dict.fromkeys(spec.torch_factorized_type() for spec in SPECS.values()))


def is_factorized(module: nn.Module) -> bool:
    """Whether ``module`` is the factorized module of an operator spec (what :func:`apply_plan` installs)."""
    return isinstance(module, FACTORIZED)


def data_fitted(module: nn.Module) -> bool:
    """Whether a factorized module's factors were fitted to data (a data-aware plan's sidecar), not
    recomputed from its weights alone."""
    return bool(getattr(module, "data_fitted", False))


def _module_path(model: nn.Module, entry: LayerPlan) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    for key in (entry.weight, entry.name):
        if not key:
            continue
        try:
            return names[id(weight_to_module(model, key))]
        except (KeyError, UsageError):
            continue
    raise UsageError(f"the plan's layer {entry.name!r} (weight {entry.weight!r}) matches no module of the model")


def _spec_for_module(mod: nn.Module, path: str):
    for spec in SPECS.values():
        if isinstance(mod, spec.torch_types()):
            return spec
    kinds = sorted({t.__name__ for spec in SPECS.values() for t in spec.torch_types()})
    raise UsageError(f"module {path!r} is a {type(mod).__name__}, not one of the modules a plan factorizes "
                     f"({', '.join(kinds)})")


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
            raise UsageError("the model has BatchNorm: pass example_inputs so that it is folded as in the ONNX export")
        model = copy.deepcopy(model).eval()
    for entry in plan.layers:
        path = _module_path(model, entry)
        mod = model.get_submodule(path)
        if isinstance(model.get_submodule(path.rpartition(".")[0]), nn.MultiheadAttention):
            raise UsageError(f"the plan's layer {entry.name!r} is a projection of the nn.MultiheadAttention "
                             f"{path.rpartition('.')[0]!r}, which reads its weight directly: leave it out of the "
                             f"plan, or write the attention with nn.Linear projections")
        spec = _spec_for_module(mod, path)
        factors = (plan.factors or {}).get(entry.name)
        fitted = factors is not None
        if factors is None:
            factors = weight_factors(spec.torch_weight4(mod), entry.k, spec.torch_scheme(entry.scheme), entry.rank)
        else:  # a sidecar is untrusted: shapes, dtype and values checked as the ONNX rewrite does
            w4 = spec.torch_weight4(mod)
            check_factor_arrays(plan, entry, w4.shape, w4.dtype)
        new = spec.torch_module(mod, entry, factors)
        new.data_fitted = fitted  # the fine-tune's feature matching asks (finetune_loop.feature_matched)
        model.set_submodule(path, new)
        parent = model.get_submodule(path.rpartition(".")[0])
        if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            # their inference fast path reads linear1/linear2.weight, which a factorized layer does not have;
            # torch skips that path for a layer with a hook attached
            model.get_submodule(path).register_forward_hook(_keeps_torch_off_the_fast_path)
    return model


def _keeps_torch_off_the_fast_path(_module, _inputs, _output):
    return None
