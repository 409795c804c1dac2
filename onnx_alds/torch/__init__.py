"""Torch side of onnx-alds: export to ONNX, apply a Plan, fine-tune (needs the ``torch`` extra).

Importing this package imports torch; the ONNX core never imports it.
"""

from .export import export, export_from_factory, fold_batchnorm, weight_to_module
from .finetune import evaluate, finetune
from .modules import apply_plan, with_batchnorm

__all__ = [
    "export",
    "export_from_factory",
    "fold_batchnorm",
    "weight_to_module",
    "apply_plan",
    "with_batchnorm",
    "finetune",
    "evaluate",
]
