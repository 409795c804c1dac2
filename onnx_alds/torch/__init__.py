"""Torch side of onnx-alds: export to ONNX, apply a Plan, fine-tune (needs the ``torch`` extra).

The names below import torch when first used (PEP 562), so that the CLI can
register ``onnx-alds finetune`` without importing torch; the ONNX core never
imports it.
"""

from __future__ import annotations

import importlib
import sys
import types

_NAMES = {
    "export": "export",
    "export_from_factory": "export",
    "fold_batchnorm": "export",
    "weight_to_module": "export",
    "apply_plan": "modules",
    "with_batchnorm": "batchnorm",
    "finetune": "finetune",
    "reconstruct": "reconstruct",
    "FinetuneConfig": "finetune_config",
    "evaluate": "finetune",
    "compress_and_finetune": "finetune_cli",
}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES))


class _Package(types.ModuleType):
    """``onnx_alds.torch.finetune`` is the function, as with an eager ``from .finetune import finetune``:
    importing the submodule of the same name must not rebind it to the module."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _NAMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
